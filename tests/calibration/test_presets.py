"""The KVTuner preset YAML import/export, on the 32 presets published with the paper (bundled in
kvtuner_vllm/presets: 16 `pertoken`, 16 `kivi`)."""

import re
from pathlib import Path

import pytest
import yaml

from calibration import cli
from kvtuner_vllm.map_resolution import PRESET_DIR
from kvtuner_vllm.precision_map import KVTUNER_KIVI, PrecisionMap

NAME = re.compile(r"^(?P<model>.+)_(?P<scheme>pertoken|kivi)_KVTuner(?P<budget>\d+)_(?P<n>\d)$")


def preset_files() -> list[Path]:
    return sorted(PRESET_DIR.glob("*_KVTuner*.yaml"))


def test_all_32_presets_are_bundled():
    names = [NAME.match(p.stem) for p in preset_files()]
    assert len(names) == 32 and all(names)
    assert sorted(m["scheme"] for m in names).count("kivi") == 16


@pytest.mark.parametrize("path", preset_files(), ids=lambda p: p.stem)
def test_import_export_round_trip(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    name = NAME.match(path.stem)
    out = tmp_path / "map.json"
    assert cli.main(["import-preset", str(path), "--group-size", "64", "--out", str(out)]) == 0
    loaded = PrecisionMap.load(out)
    assert loaded.model == name["model"] and loaded.format == "kvtuner-precision-map/v2"
    expected = KVTUNER_KIVI if name["scheme"] == "kivi" else {"scheme": "per-token-group", "group_size": 64,
                                                               "key_group_size": 0, "residual_length": 0}
    assert loaded.format_options == expected
    assert [(p.key_bits, p.value_bits) for p in loaded.layers] == [
        (raw[i]["nbits_key"], raw[i]["nbits_value"]) for i in range(len(raw))
    ]
    assert loaded.avg_bits <= int(name["budget"])  # KVTuner<budget>: searched under that many average bits
    assert cli.main(["export-preset", str(out), "--out", str(tmp_path / "back.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == raw
