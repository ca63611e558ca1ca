"""Every bad input stops `vllm serve --kv-cache-dtype kvtuner` at startup, before the model is
loaded and before any KV memory is allocated, with a message naming the file, the layer and the
fix, and a non-zero exit. Tiny 4-layer model; the cases run a few at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import VLLM, free_port, kvtuner_args, serve_command, server_env, write_map

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY_LAYERS = 4


def _variant(tiny: Path, dest: Path, **config) -> Path:
    """A copy of the tiny model with config.json changes (weights linked: loading never starts)."""
    dest.mkdir()
    for item in tiny.iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item)
    data = json.loads((tiny / "config.json").read_text())
    data.update(config)
    (dest / "config.json").write_text(json.dumps(data))
    return dest


def _cases(tiny: Path, tmp: Path) -> dict[str, tuple[Path, list[str], list[str]]]:
    """name -> (model, extra serve args, expected fragments of the error)."""

    def map_args(name: str, **kwargs) -> list[str]:
        return kvtuner_args(write_map(tmp / name, **{"pairs": [(4, 4)] * TINY_LAYERS, **kwargs}))

    malformed = tmp / "malformed.json"
    malformed.write_text('{"format": "kvtuner-precision-map/v1", "layers": [')
    bad_bits = write_map(tmp / "bits.json", [(4, 4), (4, 4), (3, 4), (4, 4)])
    scheme = tmp / "scheme.json"
    scheme.write_text(json.dumps({**json.loads(write_map(tmp / "s.json", [(4, 4)] * TINY_LAYERS).read_text()),
                                  "scheme": "per-channel-keys"}))
    return {
        "unreadable": (tiny, kvtuner_args(tmp / "missing.json"), ["missing.json", "cannot read it"]),
        "malformed": (tiny, kvtuner_args(malformed), ["malformed.json", "not valid JSON or YAML"]),
        "layers": (tiny, map_args("layers.json", pairs=[(4, 4)] * 30),
                   ["layers.json", "the map has 30 layers but the model has 4", "calibrated for this model"]),
        "bits": (tiny, kvtuner_args(bad_bits), ["bits.json", "layer 2 key_bits", "(2, 4, 8, 16)"]),
        "group_size": (tiny, map_args("group.json", group_size=128),
                       ["group.json", "group size 128 does not divide head size 64", "choose a group size"]),
        "scheme": (tiny, kvtuner_args(scheme), ["scheme.json", "scheme", "per-token-group"]),
        "other_model": (tiny, map_args("other.json", model="Qwen2.5-7B-Instruct"),
                        ["other.json", "made for model 'Qwen2.5-7B-Instruct'", "calibrated for this model"]),
        "head_size": (_variant(tiny, tmp / "head32", head_dim=32), ["--kv-cache-dtype", "kvtuner"],
                      ["head size 32", "--kv-cache-dtype auto"]),
        "sliding_window": (_variant(tiny, tmp / "sliding", sliding_window=64), ["--kv-cache-dtype", "kvtuner"],
                           ["sliding-window attention", "--kv-cache-dtype auto"]),
        "spec_decode": (tiny, ["--kv-cache-dtype", "kvtuner", "--speculative-config",
                               json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})],
                        ["speculative decoding", "--kv-cache-dtype auto"]),
    }


def _serve(model: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = serve_command(model, free_port(), *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=server_env(), check=False)


@pytest.fixture(scope="module")
def outcomes(tiny_llama_dir, tmp_path_factory):
    if not VLLM.exists():
        pytest.fail(f"{VLLM} is missing: run `bash scripts/setup.sh`")
    tmp = tmp_path_factory.mktemp("bad-input")
    cases = _cases(tiny_llama_dir(64), tmp)
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(cases, pool.map(lambda c: _serve(c[0], c[1]), cases.values()), strict=True))
    yield {name: (results[name], cases[name][2]) for name in cases}
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", ["unreadable", "malformed", "layers", "bits", "group_size", "scheme", "other_model",
                                  "head_size", "sliding_window", "spec_decode"])
def test_bad_input_exits_before_loading(outcomes, case):
    result, fragments = outcomes[case]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} missing from:\n{output[-3000:]}"
    assert "Starting to load model" not in output  # refused in the API server, before any engine process
