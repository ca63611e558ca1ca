"""Which precision map a served model gets, and whether it fits the model. No vLLM import.

Resolution order (first that exists wins):
  1. `--additional-config '{"kvtuner": {"precision_map": PATH}}'`
  2. the environment variable KVTUNER_PRECISION_MAP
  3. `kvtuner_precision_map.json` in the model folder
  4. a preset bundled in kvtuner_vllm/presets/ for the model, matched by name
  5. uniform K8V4 with a full-precision window of 32 positions, with a warning
The `kvtuner` additional-config object may also set `group_size` (overrides the map's) and
`preset` (the stem of a bundled preset, instead of matching by name).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtuner_vllm import format as kvformat
from kvtuner_vllm.precision_map import PrecisionMap, PrecisionMapError

logger = logging.getLogger(__name__)

ENV_VAR = "KVTUNER_PRECISION_MAP"
MODEL_FOLDER_FILE = "kvtuner_precision_map.json"
PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PAIR = (8, 4)
DEFAULT_RESIDUAL_LENGTH = 32  # a near-lossless default; kvtuner-calibrate finds smaller maps
CONFIG_KEY = "kvtuner"
# Where the API server leaves the resolved map inside additional_config, so that EngineCore and
# the workers (which get the pickled VllmConfig) use exactly the map that was validated.
RESOLVED_KEY = "_resolved"
USER_KEYS = ("precision_map", "group_size", "preset")


@dataclass(frozen=True)
class ModelInfo:
    """What the map is checked against: from vLLM's ModelConfig, or built by hand in tests."""

    names: tuple[str, ...]  # model path / repo id / served names: for preset matching
    folder: Path | None  # local model folder, if any
    num_layers: int
    head_size: int
    num_kv_heads: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int | None = None  # vLLM's, once known: the window and kivi key groups must fit in a block


@dataclass(frozen=True)
class ResolvedMap:
    map: PrecisionMap
    source: str
    warnings: tuple[str, ...] = field(default=())

    def to_config(self) -> dict[str, Any]:
        return {"map": self.map.model_dump(mode="json", exclude_none=True), "source": self.source}

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> ResolvedMap:
        return cls(PrecisionMap.model_validate(data["map"]), data["source"])


def user_options(additional_config: dict | None) -> dict[str, Any]:
    """The user's `kvtuner` object from --additional-config; typos are errors, not silently ignored."""
    options = dict((additional_config or {}).get(CONFIG_KEY) or {})
    options.pop(RESOLVED_KEY, None)
    unknown = sorted(set(options) - set(USER_KEYS))
    if unknown:
        raise PrecisionMapError(
            f'--additional-config "{CONFIG_KEY}": unknown key(s) {unknown}; the known keys are {list(USER_KEYS)}'
        )
    group_size = options.get("group_size")
    if group_size is not None and not isinstance(group_size, int):
        raise PrecisionMapError(
            f'--additional-config "{CONFIG_KEY}": group_size must be an integer, got {group_size!r}'
        )
    return options


def default_group_size(head_size: int) -> int:
    """64 where it divides the head (the calibrated default); otherwise one group per head."""
    return 64 if head_size % 64 == 0 else head_size


def resolve(options: dict[str, Any], model: ModelInfo, environ: os._Environ | dict = os.environ) -> ResolvedMap:
    """Pick the map by the order in the module docstring, load it and check it against the model."""
    group_size = options.get("group_size") or default_group_size(model.head_size)
    resolved = _pick(options, model, environ, group_size)
    if options.get("group_size") is not None and resolved.map.group_size != options["group_size"]:
        resolved = ResolvedMap(
            resolved.map.model_copy(update={"group_size": options["group_size"]}),
            f"{resolved.source} (group size {options['group_size']} from --additional-config)",
            resolved.warnings,
        )
    check(resolved, model)
    return resolved


def _pick(options: dict[str, Any], model: ModelInfo, environ, group_size: int) -> ResolvedMap:
    if options.get("precision_map"):
        path = Path(options["precision_map"]).expanduser()
        return ResolvedMap(PrecisionMap.load(path, group_size), f"--additional-config precision_map {path}")
    if environ.get(ENV_VAR):
        path = Path(environ[ENV_VAR]).expanduser()
        return ResolvedMap(PrecisionMap.load(path, group_size), f"${ENV_VAR} {path}")
    if model.folder is not None and (model.folder / MODEL_FOLDER_FILE).is_file():
        path = model.folder / MODEL_FOLDER_FILE
        return ResolvedMap(PrecisionMap.load(path, group_size), f"model folder {path}")
    preset = find_preset(model.names, options.get("preset"))
    if preset is not None:
        return ResolvedMap(PrecisionMap.load(preset, group_size), f"bundled preset {preset.name}")
    label = f"K{DEFAULT_PAIR[0]}V{DEFAULT_PAIR[1]}"
    warning = (
        f"no precision map found for {model.names[0]} (looked at --additional-config, ${ENV_VAR}, "
        f"{MODEL_FOLDER_FILE} in the model folder and the bundled presets): using uniform {label}; "
        "calibrate one with kvtuner-calibrate"
    )
    uniform = PrecisionMap.uniform(model.num_layers, *DEFAULT_PAIR, group_size,
                                   residual_length=DEFAULT_RESIDUAL_LENGTH)
    return ResolvedMap(uniform, f"default uniform {label}", (warning,))


def normalize_name(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama318binstruct' (case, punctuation and org free)."""
    base = re.sub(r"[^a-z0-9]", "", name.rstrip("/").split("/")[-1].lower())
    return base.removeprefix("meta")


def preset_model_name(path: Path) -> str:
    """Presets are `<model>.json` (our calibration) or `<model>_<scheme>_KVTuner<budget>_<n>.yaml`."""
    return path.stem.split("_")[0]


def find_preset(names: tuple[str, ...], wanted: str | None = None) -> Path | None:
    """The bundled preset for the model: our own calibrated JSON first, else the more accurate
    (higher average bits) of KVTuner's two ~4-bit Pareto points, from its `kivi` search (the one
    behind its headline results, served with KVTuner's window) before its `pertoken` one."""
    presets = sorted(PRESET_DIR.glob("*.json")) + sorted(PRESET_DIR.glob("*.yaml"))
    if wanted is not None:
        for path in presets:
            if path.stem == wanted or path.name == wanted:
                return path
        raise PrecisionMapError(
            f'--additional-config "{CONFIG_KEY}": no bundled preset named {wanted!r}; '
            f"bundled: {[p.stem for p in presets]}"
        )
    keys = {normalize_name(n) for n in names if n}
    matches = [p for p in presets if _matches(normalize_name(preset_model_name(p)), keys)]
    calibrated = [p for p in matches if p.suffix == ".json"]
    if calibrated:
        return calibrated[0]
    for scheme in ("kivi", "pertoken"):
        four_bit = [p for p in matches if f"_{scheme}_KVTuner4_" in p.name]
        if four_bit:
            return max(four_bit, key=lambda p: PrecisionMap.load(p).avg_bits)
    return None


def _matches(preset_key: str, model_keys: set[str]) -> bool:
    # A converted copy may carry a suffix (SmolLM2-135M-Instruct-bf16): a prefix match is enough,
    # since the layer-count check still rejects a preset made for a different model.
    return any(key == preset_key or key.startswith(preset_key) for key in model_keys)


def check(resolved: ResolvedMap, model: ModelInfo) -> None:
    """The one check of a map against the model it serves: made for it (name), its layer count, head size
    and group size, and, once vLLM's block size is known, that the window and kivi key groups fit a block."""
    map_ = resolved.map
    if map_.model and not _matches(normalize_name(map_.model), {normalize_name(n) for n in model.names if n}):
        raise PrecisionMapError(
            f"{resolved.source}: the map was made for model {map_.model!r}, not for {model.names[0]!r}; "
            f"use a map calibrated for this model, or remove its \"model\" field if it really fits"
        )
    map_.check_model(model.num_layers, model.head_size, source=resolved.source)
    if model.block_size is not None:
        # The window and key groups are the map's, the same in every layer: layer 0 stands for all.
        check_block_size(map_.layer_format(0, model.head_size, model.dtype), model.block_size, resolved.source)


def check_block_size(fmt: kvformat.LayerFormat, block_size: int, source: str) -> None:
    """A layer format against vLLM's block size, as a PrecisionMapError that names `source`."""
    try:
        kvformat.check_block_size(fmt, block_size)
    except ValueError as err:
        raise PrecisionMapError(f"{source}: {err}") from None
