"""What a precision map measured on a model, kept where the server's startup log finds it.

`kvtuner-vllm show-map MAP --model DIR` measures a map on the model itself (calibration.estimate)
and stores the result here, keyed by the model folder (path, config, weight files) and the map's
bits and format; a server started later with the same map and model prints it. No torch import:
the startup log reads these files inside vLLM's process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kvtuner_vllm.bundled_models import cache_root
from kvtuner_vllm.precision_map import PrecisionMap

RECORD_VERSION = 2  # bump when the stored record changes: an older record is then not found, never misread
LOSSY_PPL_PCT = 2.0  # a map that costs more perplexity than this on the measured text is called lossy
KIVI_BETTER = 2.0  # kivi keys are recommended when they measure this many times lower KL at the same bits


def model_key(model_dir: str | Path) -> list:
    """What a measurement on the folder depends on: its path, config and weight files (name, size, mtime)."""
    folder = Path(model_dir).resolve()
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return [str(folder), (folder / "config.json").read_text(), weights]


def map_key(pmap: PrecisionMap) -> dict:
    """What a measurement of the map depends on: its format options and its pairs (not its name or record)."""
    return {**pmap.format_options, "layers": [[p.key_bits, p.value_bits] for p in pmap.layers]}


def estimate_path(model_dir: str | Path, pmap: PrecisionMap) -> Path:
    text = json.dumps([RECORD_VERSION, model_key(model_dir), map_key(pmap)], sort_keys=True)
    return cache_root() / "map-estimates" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def save(model_dir: str | Path, pmap: PrecisionMap, estimate: dict[str, Any]) -> Path:
    path = estimate_path(model_dir, pmap)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(estimate, indent=1) + "\n")
    tmp.replace(path)
    return path


def load(model_dir: str | Path, pmap: PrecisionMap) -> dict[str, Any] | None:
    """The stored measurement, or None where there is none or it cannot be read (the startup log must not fail
    on a damaged cache file)."""
    try:
        found = json.loads(estimate_path(model_dir, pmap).read_text())
        describe(found)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found


def is_calibrated_for(pmap: PrecisionMap, model_name: str) -> bool:
    """Whether kvtuner-calibrate chose this map for a model of this name (its record says so)."""
    return bool(pmap.calibration) and (pmap.model or "") == model_name


def describe(estimate: dict[str, Any]) -> list[str]:
    """The measurement in words, with a warning for a lossy map and the kivi alternative where it measures
    KIVI_BETTER times better; one string per line."""
    this = estimate["map"]
    lines = [f"measured on {estimate['tokens']} tokens of {estimate['text']}: KL {this['kl']:.4f} nats/token, "
             f"perplexity {this['ppl_delta_pct']:+.2f}% vs unquantized ({this['bytes_per_token']} KV bytes/token)"]
    alternative = estimate.get("kivi")
    if this["ppl_delta_pct"] > LOSSY_PPL_PCT:
        lines.append(f"WARNING: this map is lossy on this model (perplexity {this['ppl_delta_pct']:+.1f}%, more "
                     f"than +{LOSSY_PPL_PCT:g}%)")
    if alternative and alternative["kl"] * KIVI_BETTER <= this["kl"]:
        lines.append(f"the same bits per layer with kivi keys ({alternative['format']}, the format calibration picks: "
                     f"{alternative['bytes_per_token']} KV bytes/token) measure KL {alternative['kl']:.4f}, perplexity "
                     f"{alternative['ppl_delta_pct']:+.2f}%: per-token keys measure badly on this model; use that "
                     "format or a calibrated map (kvtuner-calibrate MODEL_DIR --budget B --out DIR)")
    return lines
