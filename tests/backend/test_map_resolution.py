"""Map resolution order, preset matching and the bad-map messages (no vLLM, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtuner_vllm.map_resolution import (
    ENV_VAR,
    MODEL_FOLDER_FILE,
    PRESET_DIR,
    ModelInfo,
    find_preset,
    resolve,
    user_options,
)
from kvtuner_vllm.precision_map import PrecisionMap, PrecisionMapError

SMOL = ModelInfo(names=("/models/SmolLM2-135M-Instruct",), folder=None, num_layers=30, head_size=64, num_kv_heads=3)


def write_map(path: Path, key_bits=4, value_bits=2, num_layers=30, group_size=64, model=None, **extra) -> Path:
    layers = [{"key_bits": key_bits, "value_bits": value_bits}] * num_layers
    data = {
        "format": "kvtuner-precision-map/v1",
        "num_layers": num_layers,
        "group_size": group_size,
        "layers": layers,
        **({"model": model} if model else {}),
        **extra,
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct"
    model.mkdir()
    return model


def smol_in(folder: Path) -> ModelInfo:
    return ModelInfo(names=(str(folder),), folder=folder, num_layers=30, head_size=64, num_kv_heads=3)


def test_order_additional_config_then_env_then_folder_then_default(tmp_path, folder):
    cli = write_map(tmp_path / "cli.json", 8, 8)
    env = write_map(tmp_path / "env.json", 4, 4)
    write_map(folder / MODEL_FOLDER_FILE, 2, 2)
    model = smol_in(folder)

    first = resolve({"precision_map": str(cli)}, model, {ENV_VAR: str(env)})
    assert first.map.layers[0].label == "KV8" and "--additional-config" in first.source
    second = resolve({}, model, {ENV_VAR: str(env)})
    assert second.map.layers[0].label == "KV4" and ENV_VAR in second.source
    third = resolve({}, model, {})
    assert third.map.layers[0].label == "KV2" and "model folder" in third.source
    (folder / MODEL_FOLDER_FILE).unlink()
    other = ModelInfo(names=("/x/unknown-model",), folder=folder, num_layers=30, head_size=64, num_kv_heads=3)
    last = resolve({}, other, {})
    assert last.map.layers[0].label == "K8V4" and last.map.num_layers == 30 and last.warnings
    assert last.map.residual_length == 32 and last.map.scheme == "per-token-group"


def test_bundled_presets_match_by_name():
    llama = find_preset(("meta-llama/Llama-3.1-8B-Instruct",))
    assert llama is not None and llama.name.startswith("Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_")
    # the more accurate of the two ~4-bit Pareto points, with KVTuner's kivi settings
    loaded = PrecisionMap.load(llama)
    assert loaded.avg_bits == pytest.approx(3.25, abs=0.01)
    assert (loaded.scheme, loaded.key_group_size, loaded.residual_length, loaded.group_size) == ("kivi", 32, 32, 32)
    assert find_preset(("Qwen/Qwen2.5-7B-Instruct",)).name.startswith("Qwen2.5-7B-Instruct_kivi")
    assert find_preset(("mistralai/Mistral-7B-Instruct-v0.3",)) is not None
    assert find_preset(("Qwen/Qwen2.5-0.5B-Instruct",)) is None
    assert find_preset(("HuggingFaceTB/SmolLM2-135M-Instruct",)).name == "SmolLM2-135M-Instruct.json"
    model = ModelInfo(
        names=("meta-llama/Llama-3.1-8B-Instruct",), folder=None, num_layers=32, head_size=128, num_kv_heads=8
    )
    resolved = resolve({}, model, {})
    assert "bundled preset" in resolved.source and resolved.map.num_layers == 32


def test_every_bundled_kvtuner_preset_loads_with_its_scheme():
    presets = sorted(PRESET_DIR.glob("*_KVTuner*.yaml"))
    assert len(presets) == 32
    for path in presets:
        loaded = PrecisionMap.load(path)
        expected = ("kivi", 32) if "_kivi_" in path.name else ("per-token-group", 0)
        assert (loaded.scheme, loaded.residual_length) == expected, path.name


def test_preset_option_and_group_size_override(tmp_path):
    model = ModelInfo(
        names=("/models/Meta-Llama-3.1-8B-Instruct",), folder=None, num_layers=32, head_size=128, num_kv_heads=8
    )
    resolved = resolve({"preset": "Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_0", "group_size": 128}, model, {})
    assert resolved.map.group_size == 128 and resolved.map.avg_bits > 5
    with pytest.raises(PrecisionMapError, match="no bundled preset named"):
        resolve({"preset": "nope"}, model, {})


def test_unknown_option_is_an_error():
    with pytest.raises(PrecisionMapError, match=r"unknown key\(s\) \['precison_map'\]"):
        user_options({"kvtuner": {"precison_map": "x.json"}})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.json", r"missing\.json: cannot read it"),
        (
            lambda p: (p / "bad.json").write_text("{not: [valid") and p / "bad.json",
            r"bad\.json: not valid JSON or YAML",
        ),
        (
            lambda p: write_map(p / "short.json", num_layers=12),
            r"short\.json: the map has 12 layers but the model has 30",
        ),
        (lambda p: write_map(p / "bits.json", key_bits=3), r"bits\.json: layer 0 key_bits.*allowed: \(2, 4, 8, 16\)"),
        (
            lambda p: write_map(p / "group.json", group_size=128),
            r"group\.json: group size 128 does not divide head size 64",
        ),
        (lambda p: write_map(p / "scheme.json", scheme="per-channel"),
         r"scheme\.json: scheme.*'per-token-group', 'kivi'"),
        (
            lambda p: write_map(p / "other.json", model="Qwen2.5-7B-Instruct"),
            r"other\.json.*made for model 'Qwen2\.5-7B-Instruct'",
        ),
    ],
    ids=["unreadable", "malformed", "layers", "bits", "group-size", "scheme", "other-model"],
)
def test_bad_maps_name_the_file_and_the_fix(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(PrecisionMapError, match=message):
        resolve({"precision_map": str(path)}, SMOL, {})


def test_unknown_kvtuner_scheme_in_a_preset_name(tmp_path):
    path = tmp_path / "SmolLM2-135M-Instruct_hadamard_KVTuner4_0.yaml"
    path.write_text("".join(f"{i}:\n  nbits_key: 4\n  nbits_value: 2\n" for i in range(30)))
    with pytest.raises(PrecisionMapError, match="unknown KVTuner scheme 'hadamard'.*pertoken.*kivi"):
        resolve({"precision_map": str(path)}, SMOL, {})


@pytest.mark.parametrize(("options", "message"), [
    ({"scheme": "kivi", "residual_length": 32}, "kivi scheme needs key_group_size"),
    ({"scheme": "kivi", "key_group_size": 64, "residual_length": 32}, "residual_length >= key_group_size"),
    ({"key_group_size": 32}, "key_group_size applies to the kivi scheme only"),
    ({"residual_length": 300}, r"residual_length 300 must lie in \[0, 256\]"),
])
def test_bad_v2_options_name_the_fix(tmp_path, options, message):
    path = write_map(tmp_path / "v2.json", format="kvtuner-precision-map/v2", **options)
    with pytest.raises(PrecisionMapError, match=message):
        resolve({"precision_map": str(path)}, SMOL, {})


def test_v1_maps_keep_their_meaning(tmp_path):
    loaded = resolve({"precision_map": str(write_map(tmp_path / "v1.json"))}, SMOL, {}).map
    assert (loaded.scheme, loaded.residual_length, loaded.key_group_size) == ("per-token-group", 0, 0)
    with pytest.raises(PrecisionMapError, match="need .format.: .kvtuner-precision-map/v2"):
        resolve({"precision_map": str(write_map(tmp_path / "v1w.json", residual_length=32))}, SMOL, {})


def test_kvtuner_yaml_with_any_name_is_read(tmp_path):
    path = tmp_path / "my-map.yaml"
    path.write_text("".join(f"{i}:\n  nbits_key: 8\n  nbits_value: 4\n" for i in range(30)))
    resolved = resolve({"precision_map": str(path)}, SMOL, {})
    assert resolved.map.avg_bits == 6 and resolved.map.group_size == 64


def test_bundled_calibrated_presets_are_the_recorded_calibration_maps():
    """A calibrated JSON preset is the map a recorded run in benchmarks/calibration chose, record included."""
    runs = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration"
    recorded = {path.read_text() for path in runs.glob("*/precision_map.json")}
    presets = sorted(PRESET_DIR.glob("*.json"))
    assert [p.name for p in presets] == ["Qwen2.5-Coder-1.5B-Instruct.json",
                                         "Qwen2.5-Coder-1.5B-Instruct_budget3.25.json",
                                         "Qwen2.5-Coder-1.5B-Instruct_budget5.json", "SmolLM2-135M-Instruct.json"]
    assert all(path.read_text() in recorded for path in presets)
    budgets = {p.name: PrecisionMap.load(p).calibration["budget"] for p in presets}
    assert budgets["Qwen2.5-Coder-1.5B-Instruct.json"] == budgets["SmolLM2-135M-Instruct.json"] == 4.0
    qwen = find_preset(("/cache/Qwen2.5-Coder-1.5B-Instruct",))
    assert qwen.name == "Qwen2.5-Coder-1.5B-Instruct.json"  # budget 4 by default, the others by name
    model = ModelInfo(names=("Qwen2.5-Coder-1.5B-Instruct",), folder=None, num_layers=28, head_size=128,
                      num_kv_heads=2)
    chosen = resolve({"preset": "Qwen2.5-Coder-1.5B-Instruct_budget3.25"}, model, {})
    assert chosen.map.calibration["budget"] == 3.25
