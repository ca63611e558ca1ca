"""The precision maps the benchmarks serve: uniform pairs and the recorded calibrated maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvtuner_vllm.precision_map import PrecisionMap

UNIFORM_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))
CALIBRATION_RUNS = Path(__file__).resolve().parent / "calibration"


def pair_label(key_bits: int, value_bits: int) -> str:
    return f"KV{key_bits}" if key_bits == value_bits else f"K{key_bits}V{value_bits}"


def write_benchmark_maps(model_dir: str, out: Path, group_size: int = 64) -> Path:
    """uniform_<pair>.json for the model, and calibrated_<run>.json for each recorded calibration run."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    for k, v in UNIFORM_PAIRS:
        PrecisionMap.uniform(layers, k, v, group_size, model=Path(model_dir).name).save(
            out / f"uniform_{pair_label(k, v)}.json"
        )
    for run_map in sorted(CALIBRATION_RUNS.glob("*/precision_map.json")):
        shutil.copy(run_map, out / f"calibrated_{run_map.parent.name}.json")
    return out
