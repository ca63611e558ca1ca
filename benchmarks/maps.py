"""The KV cache configurations the quality benchmark serves: vLLM's own, uniform kvtuner maps in
format v1 (no window) and v2 (full-precision window; per-token groups or KIVI keys), and the
recorded calibrated maps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvtuner_vllm.precision_map import LayerPrecision, PrecisionMap

CALIBRATION_RUNS = Path(__file__).resolve().parent / "calibration"
# name -> (group size, map options, uniform pairs served)
VARIANTS = {
    "v1": (64, {}, ((8, 8), (4, 4))),
    "v2": (64, {"residual_length": 32}, ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))),
    # the option the calibration runs chose (benchmarks/calibration): the uniform maps they compete with
    "v2 kivi": (32, {"scheme": "kivi", "key_group_size": 32, "residual_length": 64}, ((4, 4), (2, 4), (4, 2))),
}


@dataclass(frozen=True)
class KVConfig:
    name: str
    kv_cache_dtype: str
    precision_map: str | None = None  # kvtuner only
    avg_bits: float = 16.0


def uniform_config(model_dir: str, out: Path, key_bits: int, value_bits: int, options: dict, group_size: int,
                   variant: str = "v2 kivi") -> KVConfig:
    """A uniform map for the model, written into `out`, named '<variant> <pair>' as in the quality table."""
    model = Path(model_dir).name
    layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    pmap = PrecisionMap.uniform(layers, key_bits, value_bits, group_size, model=model, **options)
    label = LayerPrecision(key_bits=key_bits, value_bits=value_bits).label
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"uniform_{variant.replace(' ', '_')}_{label}.json"
    pmap.save(path)
    return KVConfig(f"{variant} {label}", "kvtuner", str(path), pmap.avg_bits)


def calibrated_configs(model_dir: str) -> list[KVConfig]:
    """Each recorded calibration run's map for this model (benchmarks/calibration/*/precision_map.json)."""
    configs = []
    for run_map in sorted(CALIBRATION_RUNS.glob("*/precision_map.json")):
        pmap = PrecisionMap.load(run_map)
        if pmap.model == Path(model_dir).name:
            configs.append(KVConfig(f"KVTuner {pmap.avg_bits:.2f}b", "kvtuner", str(run_map), pmap.avg_bits))
    return configs


def write_benchmark_maps(model_dir: str, out: Path) -> list[KVConfig]:
    """auto, fp8, a uniform map per variant and pair, and each recorded calibration run's map for this model."""
    configs = [KVConfig("auto", "auto"), KVConfig("fp8 (vLLM)", "fp8", avg_bits=8.0)]
    for variant, (group_size, options, pairs) in VARIANTS.items():
        configs += [uniform_config(model_dir, out, k, v, options, group_size, variant) for k, v in pairs]
    return configs + calibrated_configs(model_dir)


def select_configs(configs: list[KVConfig], names: list[str] | None, keep_baselines: bool = True) -> list[KVConfig]:
    """The configurations named (all when `names` is empty), with auto and the calibrated maps (KVTuner rows) kept
    unless `keep_baselines` is False; an unknown name is an error that lists the known ones."""
    if not names:
        return configs
    unknown = sorted(set(names) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {[c.name for c in configs]}")
    def wanted(config: KVConfig) -> bool:
        baseline = config.name == "auto" or config.name.startswith("KVTuner")
        return config.name in names or (keep_baselines and baseline)

    return [c for c in configs if wanted(c)]
