"""The per-layer precision map: schema, loading (v1/v2 JSON/YAML and KVTuner preset YAML),
validation against a model, and a capacity summary. No vLLM import.

v2 adds the packed format's scheme options (format.py): `scheme` ("per-token-group" or
"kivi"), `key_group_size` (kivi's token group) and `residual_length` (the full-precision
window). A v1 map has none of them and keeps its meaning: per-token groups, no window.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvtuner_vllm import format as kvformat
from kvtuner_vllm.errors import KVTunerConfigError

MAP_FORMAT = "kvtuner-precision-map/v2"
MAP_FORMATS = ("kvtuner-precision-map/v1", MAP_FORMAT)
Bits = Literal[2, 4, 8, 16]
# KVTuner's own settings for its presets' schemes (its kivi mode: residual 32, groups of 32).
KVTUNER_KIVI = {"scheme": kvformat.KIVI, "key_group_size": 32, "residual_length": 32, "group_size": 32}


class PrecisionMapError(KVTunerConfigError):
    """A map that cannot be used: the message names the file, the layer and the fix."""


class LayerPrecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key_bits: Bits
    value_bits: Bits

    @property
    def label(self) -> str:
        if self.key_bits == self.value_bits:
            return f"KV{self.key_bits}"
        return f"K{self.key_bits}V{self.value_bits}"


class PrecisionMap(BaseModel):
    """One (key_bits, value_bits) pair per decoder layer, with the packed format's options."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["kvtuner-precision-map/v1", "kvtuner-precision-map/v2"] = MAP_FORMAT
    model: str | None = None
    num_layers: int = Field(gt=0)
    scheme: Literal["per-token-group", "kivi"] = kvformat.PER_TOKEN
    group_size: int = Field(gt=0)
    key_group_size: int = Field(default=0, ge=0)
    residual_length: int = Field(default=0, ge=0)
    layers: list[LayerPrecision]
    calibration: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PrecisionMap:
        if len(self.layers) != self.num_layers:
            raise ValueError(
                f"num_layers is {self.num_layers} but {len(self.layers)} layer entries are given: "
                "give exactly one entry per decoder layer"
            )
        if self.format == MAP_FORMATS[0] and (self.scheme != kvformat.PER_TOKEN or self.residual_length):
            raise ValueError(f'scheme and residual_length need "format": "{MAP_FORMAT}"')
        kvformat.check_window(self.scheme, self.key_group_size, self.residual_length)
        return self

    @classmethod
    def uniform(cls, num_layers: int, key_bits: int, value_bits: int, group_size: int, model: str | None = None,
                **options) -> PrecisionMap:
        """Every layer at one pair; `options` are scheme, key_group_size, residual_length."""
        layer = LayerPrecision(key_bits=key_bits, value_bits=value_bits)
        return cls(model=model, num_layers=num_layers, group_size=group_size, layers=[layer] * num_layers, **options)

    @property
    def format_options(self) -> dict[str, Any]:
        """What every layer shares besides its bits: group size, scheme, key group, window."""
        return {"group_size": self.group_size, "scheme": self.scheme, "key_group_size": self.key_group_size,
                "residual_length": self.residual_length}

    # -- summary ------------------------------------------------------------------

    @property
    def avg_bits(self) -> float:
        return sum(p.key_bits + p.value_bits for p in self.layers) / (2 * self.num_layers)

    def pairs(self) -> dict[LayerPrecision, list[int]]:
        """Each distinct (K, V) pair with the layers that use it, in first-use order."""
        groups: dict[LayerPrecision, list[int]] = defaultdict(list)
        for index, precision in enumerate(self.layers):
            groups[precision].append(index)
        return dict(groups)

    def layer_format(self, layer: int, head_size: int, dtype) -> kvformat.LayerFormat:
        p = self.layers[layer]
        return kvformat.LayerFormat(p.key_bits, p.value_bits, head_size, self.group_size, dtype, self.scheme,
                                    self.key_group_size, self.residual_length)

    def layer_formats(self, head_size: int, dtype) -> list[kvformat.LayerFormat]:
        return [self.layer_format(i, head_size, dtype) for i in range(self.num_layers)]

    def kv_bytes_per_token(self, head_size: int, num_kv_heads: int, dtype) -> int:
        """KV cache bytes one token costs across all layers (the packed pages)."""
        return num_kv_heads * sum(f.bytes_per_token for f in self.layer_formats(head_size, dtype))

    def window_bytes_per_request(self, head_size: int, num_kv_heads: int, dtype) -> int:
        """Bytes of one running request's full-precision window rings across all layers."""
        return num_kv_heads * sum(f.window_bytes for f in self.layer_formats(head_size, dtype))

    def describe_format(self) -> str:
        """The shared options in words, for logs and `show-map`."""
        if self.scheme == kvformat.KIVI:
            text = f"kivi: keys per channel over {self.key_group_size} positions, values per {self.group_size} channels"
        else:
            text = f"per-token groups of {self.group_size} channels"
        window = (f"the last {self.residual_length} positions of a block in full precision" if self.residual_length
                  else "no full-precision window")
        return f"{text}; {window}"

    def summary(self, head_size: int, num_kv_heads: int, dtype) -> str:
        packed = self.kv_bytes_per_token(head_size, num_kv_heads, dtype)
        dense = self.num_layers * num_kv_heads * 2 * head_size * dtype.itemsize
        lines = [
            f"average bits {self.avg_bits:.2f}, {self.describe_format()}",
            f"{packed} KV bytes/token vs {dense} unquantized ({dense / packed:.2f}x the tokens)",
        ]
        window = self.window_bytes_per_request(head_size, num_kv_heads, dtype)
        if window:
            lines.append(f"window: {window:,} bytes of rings per running request ({window / packed:.0f} tokens' worth)")
        for precision, layers in self.pairs().items():
            lines.append(f"  {precision.label:>6}: {len(layers):3d} layers {compact_ranges(layers)}")
        return "\n".join(lines)

    # -- validation against a model -------------------------------------------------

    def check_model(self, num_layers: int, head_size: int, source: str = "precision map") -> None:
        if self.num_layers != num_layers:
            raise PrecisionMapError(
                f"{source}: the map has {self.num_layers} layers but the model has {num_layers}; "
                "use a map calibrated for this model (kvtuner-calibrate MODEL_DIR --out DIR)"
            )
        try:
            kvformat.check_group_size(self.group_size, head_size)
        except ValueError as err:
            raise PrecisionMapError(f"{source}: {err}") from None
        if head_size not in kvformat.SUPPORTED_HEAD_SIZES:
            raise PrecisionMapError(
                f"{source}: head size {head_size} is not supported by the kvtuner kernels "
                f"(supported: {kvformat.SUPPORTED_HEAD_SIZES}); serve this model with --kv-cache-dtype auto"
            )

    # -- I/O ----------------------------------------------------------------------------

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def to_kvtuner_yaml(self) -> str:
        """The KVTuner preset format: {layer: {nbits_key, nbits_value}}."""
        data = {i: {"nbits_key": p.key_bits, "nbits_value": p.value_bits} for i, p in enumerate(self.layers)}
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_kvtuner_preset(cls, data: dict, group_size: int, model: str | None = None,
                            scheme: str = "pertoken") -> PrecisionMap:
        """KVTuner's {layer: {nbits_key, nbits_value}}; a `kivi` preset gets KVTuner's kivi settings
        (KVTUNER_KIVI), a `pertoken` one per-token groups of `group_size` without a window, as before v2."""
        if sorted(data) != list(range(len(data))):
            raise ValueError(f"layer indices must be 0..{len(data) - 1} without gaps, got {sorted(data)}")
        layers = []
        for index in range(len(data)):
            entry = data[index]
            if not isinstance(entry, dict) or set(entry) != {"nbits_key", "nbits_value"}:
                raise ValueError(f"layer {index}: expected nbits_key and nbits_value, got {entry!r}")
            layers.append(_layer(index, entry["nbits_key"], entry["nbits_value"]))
        options = KVTUNER_KIVI if scheme == "kivi" else {"group_size": group_size}
        return cls(model=model, num_layers=len(layers), layers=layers, **options)

    @classmethod
    def load(cls, path: str | Path, group_size: int = 64) -> PrecisionMap:
        """Load a map (JSON or YAML) or a KVTuner preset YAML (a `pertoken` one gets `group_size`)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except OSError as err:
            raise PrecisionMapError(f"precision map {path}: cannot read it ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise PrecisionMapError(f"precision map {path}: not valid JSON or YAML ({err})") from None
        try:
            if isinstance(data, dict) and "format" in data:
                return cls.model_validate(data)
            if isinstance(data, dict) and data and all(isinstance(k, int) for k in data):
                model, scheme = preset_name(path)
                return cls.from_kvtuner_preset(data, group_size, model=model, scheme=scheme)
            raise ValueError(
                f'expected a precision map (a "format": "{MAP_FORMAT}" object) or a KVTuner preset '
                "(layer index -> nbits_key/nbits_value)"
            )
        except ValidationError as err:
            raise PrecisionMapError(f"precision map {path}: {_describe(err)}") from None
        except ValueError as err:
            raise PrecisionMapError(f"precision map {path}: {err}") from None


def _layer(index: int, key_bits: Any, value_bits: Any) -> LayerPrecision:
    try:
        return LayerPrecision(key_bits=key_bits, value_bits=value_bits)
    except ValidationError:
        raise ValueError(
            f"layer {index}: bits K={key_bits!r} V={value_bits!r}; each must be one of {kvformat.SUPPORTED_BITS}"
        ) from None


def _describe(err: ValidationError) -> str:
    """Pydantic's errors as one line each, with the layer named where there is one."""
    parts = []
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 2 and loc[0] == "layers":
            where = f"layer {loc[1]}" + (f" {loc[2]}" if len(loc) > 2 else "")
        else:
            where = ".".join(str(x) for x in loc) or "map"
        hint = f" (allowed: {kvformat.SUPPORTED_BITS})" if where.endswith("_bits") else ""
        if where == "scheme":
            hint = f" (known schemes: {kvformat.SCHEMES})"
        parts.append(f"{where}: {e['msg']}{hint}")
    return "; ".join(parts)


_PRESET_NAME = re.compile(r"^(?P<model>.+?)_(?P<scheme>[A-Za-z]+)_KVTuner\d+_\d+$")
PRESET_SCHEMES = ("pertoken", "kivi")


def preset_name(path: Path) -> tuple[str | None, str]:
    """(model, KVTuner scheme) of a preset named <model>_<scheme>_KVTuner<budget>_<n>.yaml; other
    names carry no model and count as `pertoken`."""
    match = _PRESET_NAME.match(path.stem)
    if match is None:
        return None, "pertoken"
    if match["scheme"] not in PRESET_SCHEMES:
        raise ValueError(
            f"unknown KVTuner scheme {match['scheme']!r} in the file name: known schemes are {PRESET_SCHEMES}"
        )
    return match["model"], match["scheme"]


def compact_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
