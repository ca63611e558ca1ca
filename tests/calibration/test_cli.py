import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calibration import cli
from kvtuner_vllm.precision_map import PrecisionMap

PRESETS = Path(__file__).resolve().parents[2].parent / "shared/reference/kvtuner-presets"
SMALL = ["--tokens", "128", "--heldout-tokens", "64", "--sensitivity-tokens", "64", "--seq-len", "64",
         "--groups", "2", "--verify", "2", "--threads", "1"]
OUTPUTS = ["precision_map.json", "pareto.json", "pareto.csv", "pareto.png", "sensitivity.png", "report.md"]


@pytest.fixture(scope="module")
def calibrated(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated")
    assert cli.main([str(tiny_dir), "--budget", "4.0", "--out", str(out), *SMALL]) == 0
    return out


def test_writes_every_output(calibrated):
    for name in OUTPUTS:
        assert (calibrated / name).stat().st_size > 0, name
    loaded = PrecisionMap.load(calibrated / "precision_map.json")
    assert loaded.num_layers == 4 and loaded.group_size == 64 and loaded.model == "tiny-llama-h64"
    assert loaded.avg_bits <= 4.0
    assert loaded.calibration["avg_bits"] == pytest.approx(loaded.avg_bits, abs=1e-3)
    assert loaded.calibration["budget"] == 4.0 and "heldout" in loaded.calibration
    front = json.loads((calibrated / "pareto.json").read_text())["front"]
    assert front and all(p["avg_bits"] <= 4.0 for p in front)
    assert sum(bool(p.get("chosen")) for p in front) == 1
    report = (calibrated / "report.md").read_text()
    for label in ["KV8", "K8V4", "K4V8", "KV4", "K8V2", "K4V2", "K2V4", "KV2", "chosen map", "unquantized"]:
        assert label in report


def test_rerun_resumes_from_the_cache(calibrated, tiny_dir, capsys):
    before = (calibrated / "precision_map.json").read_text()
    assert cli.main([str(tiny_dir), "--budget", "4.0", "--out", str(calibrated), *SMALL]) == 0
    log = capsys.readouterr().out
    for step in ["attention-error", "kl-sensitivity", "verify"]:
        assert f"[{step}] cached" in log
    assert "[heldout] cached 11 of 11 maps" in log  # bf16, 8 uniform pairs, 2 verified front maps
    after = (calibrated / "precision_map.json").read_text()
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "calibration"}  # noqa: E731
    assert strip(before) == strip(after)


def _error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # (transformers may draw a progress bar first)
    assert err.startswith("kvtuner-calibrate: error:") and "Traceback" not in stderr
    return err


def test_bad_inputs(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no config.json" in _error([str(tmp_path), "--budget", "4", "--out", out], capsys)
    assert "must be between 2" in _error([str(tiny_dir), "--budget", "1.5", "--out", out], capsys)
    assert "must be between 2" in _error([str(tiny_dir), "--budget", "17", "--out", out], capsys)
    short = tmp_path / "short.txt"
    short.write_text("far too short\n" * 3)
    assert "text too short" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--text", str(short)], capsys)
    assert "group size" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--group-size", "48"], capsys)


def test_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"")
    assert "unsupported architecture" in _error([str(model), "--budget", "4", "--out", str(tmp_path / "o")], capsys)


def test_import_export_show(tmp_path, tiny_dir, capsys):
    preset = PRESETS / "Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml"
    assert cli.main(["import-preset", str(preset), "--group-size", "64", "--out", str(tmp_path / "m.json")]) == 0
    loaded = PrecisionMap.load(tmp_path / "m.json")
    assert loaded.model == "Qwen2.5-7B-Instruct" and loaded.num_layers == 28
    assert cli.main(["export-preset", str(tmp_path / "m.json"), "--out", str(tmp_path / "p.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "p.yaml").read_text()) == yaml.safe_load(preset.read_text())
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "m.json"), "--head-size", "128", "--kv-heads", "4"]) == 0
    shown = capsys.readouterr().out
    assert "average bits 4.00" in shown and "KV bytes/token" in shown
    # a map for another layer count is refused against a model
    assert "layers" in _error(["show", str(tmp_path / "m.json"), "--model", str(tiny_dir)], capsys)


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "calibration", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "--budget" in done.stdout
