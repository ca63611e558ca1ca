"""What the server's startup log and `show-map` say a map costs: the stored measurement, its key, the
lossy-map warning and the kivi advice (no vLLM, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtuner_vllm import map_estimate
from kvtuner_vllm.map_resolution import ModelInfo, ResolvedMap
from kvtuner_vllm.precision_map import PrecisionMap
from kvtuner_vllm.startup_log import quality_lines


def _row(kl: float, ppl_delta_pct: float, fmt: str = "per-token G64 R32") -> dict:
    return {"format": fmt, "kl": kl, "ppl": 10.0, "ppl_delta_pct": ppl_delta_pct, "bytes_per_token": 6480}


def _estimate(map_row: dict, kivi_row: dict | None = None) -> dict:
    found = {"map": map_row, "tokens": 510, "text": "pydoc", "model": "m", "compute": "float32", "seconds": 3.0}
    return {**found, "kivi": kivi_row} if kivi_row else found


@pytest.fixture
def model_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "Qwen2.5-Coder-1.5B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def _map(scheme: str = "per-token-group", **extra) -> PrecisionMap:
    options = {"key_group_size": 32, "residual_length": 64} if scheme == "kivi" else {"residual_length": 32}
    return PrecisionMap.uniform(4, 4, 4, 64 if scheme != "kivi" else 32, scheme=scheme,
                                format="kvtuner-precision-map/v2", **options, **extra)


@pytest.mark.parametrize(("ppl", "kl", "kivi_kl", "lossy", "advice"), [
    (40.6, 0.30, 0.002, True, True),  # the Qwen2 case of issue 20: both lines
    (1.0, 0.010, 0.0049, False, True),  # not lossy, but kivi measures 2x better
    (1.0, 0.010, 0.0051, False, False),  # kivi not 2x better: no advice
    (2.5, 0.020, 0.015, True, False),  # lossy, and kivi would not help
])
def test_describe_warns_of_a_lossy_map_and_names_the_measured_kivi_alternative(ppl, kl, kivi_kl, lossy, advice):
    lines = map_estimate.describe(_estimate(_row(kl, ppl), _row(kivi_kl, 0.2, "kivi Gt32 G32 R64")))
    assert f"KL {kl:.4f}" in lines[0] and f"{ppl:+.2f}%" in lines[0]
    assert any(line.startswith("WARNING: this map is lossy") and f"{ppl:+.1f}%" in line for line in lines) == lossy
    kivi_lines = [line for line in lines if "kivi keys (kivi Gt32 G32 R64" in line]
    assert len(kivi_lines) == advice
    if advice:
        assert f"KL {kivi_kl:.4f}" in kivi_lines[0] and "+0.20%" in kivi_lines[0]


def test_a_stored_measurement_is_found_for_the_same_model_and_bits_only(model_folder):
    pmap = _map()
    map_estimate.save(model_folder, pmap, _estimate(_row(0.3, 40.6)))
    renamed = pmap.model_copy(update={"model": "another name"})  # the name is not what was measured
    assert map_estimate.load(model_folder, renamed)["map"]["kl"] == 0.3
    assert map_estimate.load(model_folder, _map().model_copy(update={"group_size": 32})) is None
    other_bits = pmap.model_copy(update={"layers": pmap.layers[:3] + [pmap.layers[0].model_copy(
        update={"key_bits": 8})]})
    assert map_estimate.load(model_folder, other_bits) is None
    (model_folder / "model.safetensors").write_bytes(b"other weights")  # a changed model
    assert map_estimate.load(model_folder, pmap) is None


def _info(folder: Path) -> ModelInfo:
    return ModelInfo(names=(str(folder),), folder=folder, num_layers=4, head_size=128, num_kv_heads=2)


def test_startup_log_names_the_measurement_or_how_to_get_one(model_folder):
    pmap = _map()
    resolved = ResolvedMap(pmap, "map.json")
    (hint,) = quality_lines(resolved, _info(model_folder))
    assert f"kvtuner-vllm show-map MAP --model {model_folder}" in hint
    map_estimate.save(model_folder, pmap, _estimate(_row(0.3, 40.6), _row(0.002, 0.2, "kivi Gt32 G32 R64")))
    lines = quality_lines(resolved, _info(model_folder))
    assert lines == map_estimate.describe(map_estimate.load(model_folder, pmap)) and len(lines) == 3


def test_startup_log_quotes_a_calibrated_maps_report(model_folder):
    record = {"report": {"kl": 0.0038, "ppl_delta_pct": 0.122}}
    calibrated = _map("kivi").model_copy(update={"model": model_folder.name, "calibration": record})
    (line,) = quality_lines(ResolvedMap(calibrated, "preset"), _info(model_folder))
    assert line == "calibrated for this model: KL 0.0038 nats/token, perplexity +0.12% on its report text"
    for_another = calibrated.model_copy(update={"model": "SmolLM2-135M-Instruct"})
    assert "not calibrated for this model" in quality_lines(ResolvedMap(for_another, "preset"),
                                                            _info(model_folder))[0]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"map": {"kl": 0.1}}), json.dumps([1, 2])])
def test_an_unreadable_stored_measurement_counts_as_none(model_folder, content):
    """A damaged or incomplete record (e.g. a hand edit) must not crash the server's startup log."""
    pmap = _map()
    path = map_estimate.estimate_path(model_folder, pmap)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    assert map_estimate.load(model_folder, pmap) is None
    (hint,) = quality_lines(ResolvedMap(pmap, "map.json"), _info(model_folder))
    assert "show-map" in hint
