import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_windows import TEXT_CHARS

from calibration import cli, data
from calibration import model as model_io
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption
from calibration.evaluate import Evaluator, ScoreStore
from calibration.options import Options
from kvtuner_vllm.map_resolution import PRESET_DIR
from kvtuner_vllm.precision_map import PrecisionMap

SMALL = ["--tokens", "128", "--selection-tokens", "128", "--report-tokens", "128", "--sensitivity-tokens", "64",
         "--seq-len", "64", "--block-size", "32", "--windows", "0", "16", "--key-group-sizes", "16", "--formats", "2",
         "--pop-size", "6", "--offspring", "4", "--generations", "2", "--seeds-per-format", "2", "--verify", "2",
         "--threads", "1"]
OUTPUTS = ["precision_map.json", "pareto.json", "pareto.csv", "pareto.png", "sensitivity.png", "report.md"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text(data.default_text()[:TEXT_CHARS])
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_dir, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated")
    assert cli.main([str(tiny_dir), "--budget", "4.0", "--out", str(out), "--text", str(text), *SMALL]) == 0
    return out


def test_writes_every_output(calibrated):
    for name in OUTPUTS:
        assert (calibrated / name).stat().st_size > 0, name
    loaded = PrecisionMap.load(calibrated / "precision_map.json")
    assert loaded.num_layers == 4 and loaded.model == "tiny-llama-h64" and loaded.avg_bits <= 4.0
    assert loaded.format == "kvtuner-precision-map/v2" and loaded.calibration["budget"] == 4.0
    assert loaded.calibration["avg_bits"] == pytest.approx(loaded.avg_bits, abs=1e-3)
    report = (calibrated / "report.md").read_text()
    for heading in ["Results on the report text", "The choice (selection text)", "Schemes compared",
                    "What each stage did", "uniform KV4", "best uniform map with <= its"]:
        assert heading in report


def test_chosen_map_is_the_best_on_selection_text_and_beats_no_uniform_map(calibrated):
    """On this run's own selection numbers: the chosen map has the lowest selection KL of the pool, so no uniform
    map with <= its bits does better there; the map file is that map."""
    document = json.loads((calibrated / "pareto.json").read_text())
    rows = document["evaluated"]
    pool = [r for r in rows if r["selection_pool"]]
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["selection_pool"] and chosen["avg_bits"] <= 4.0
    assert chosen["selection_kl"] == min(r["selection_kl"] for r in pool)
    uniform = [r for r in pool if r["uniform"] and r["avg_bits"] <= chosen["avg_bits"]]
    assert uniform and all(chosen["selection_kl"] <= r["selection_kl"] for r in uniform)
    loaded = PrecisionMap.load(calibrated / "precision_map.json")
    assert " ".join(p.label for p in loaded.layers) == chosen["layers"]
    uniform_kv4 = {r["option"] for r in rows if r["uniform"] and r["layers"].startswith("KV4 ")}
    assert set(document["kept_formats"]) <= uniform_kv4  # every searched option's uniform KV4 was a candidate
    searched = [r for r in rows if r["origin"] in ("seed", "search")]
    assert all(3.0 - 1e-9 <= r["avg_bits"] <= 4.0 for r in searched)  # the band [budget - 1, budget]


def test_best_uniform_maps_fit_the_chosen_maps_bits_and_bytes(calibrated):
    """The report's baselines: the uniform maps with the lowest selection KL among those scored with no more bits
    (and no more bytes per token) than the chosen map, from any format option."""
    document = json.loads((calibrated / "pareto.json").read_text())
    rows = {(r["option"], r["layers"]): r for r in document["evaluated"]}
    (chosen,) = [r for r in rows.values() if r["chosen"]]
    limits = {"equal_bits": "avg_bits", "equal_bytes": "bytes_per_token"}
    record = PrecisionMap.load(calibrated / "precision_map.json").calibration["best_uniform_report"]
    assert set(document["best_uniform"]) == set(record) == set(limits)
    for name, column in limits.items():
        option, layers = document["best_uniform"][name].split("|")
        best = rows[option, layers.replace(",", " ")]
        fits = [r for r in rows.values() if r["uniform"] and r["selection_kl"] is not None
                and r[column] <= chosen[column]]
        assert best["uniform"] and best in fits and best["selection_kl"] == min(r["selection_kl"] for r in fits)
        assert record[name]["kl"] == best["report_kl"] and record[name][column] == best[column]


def test_report_numbers_are_scored_on_the_report_text(calibrated, tiny, tiny_dir, text, tmp_path):
    """The map file's and pareto.json's report numbers are the chosen map scored on the report windows (rescored
    here from scratch: same windows, same computation, every product in float32 as the report measures, so exactly
    equal), not its selection scores."""
    defaults = Options(model_dir="", budget=4.0, out_dir="")
    model, tokenizer, info = model_io.load(tiny_dir, "cpu", defaults.dtype, defaults.matmul_dtype)
    assert info.matmul_dtype == torch.bfloat16  # the default on the tiny bf16 checkpoint
    split = data.split_tokens(tokenizer, data.load_text([text]), 128, 128, 128, 64, defaults.seed)
    loaded = PrecisionMap.load(calibrated / "precision_map.json")
    candidate = Candidate(FormatOption(**loaded.format_options), tuple(SEARCH_PAIRS.index(p) for p in loaded.layers))
    store = ScoreStore(tmp_path / "rescored.jsonl")
    scores = Evaluator(model, split.report, 32, defaults.batch_size, store, torch.float32, exact=True).score(candidate)
    (chosen,) = [r for r in json.loads((calibrated / "pareto.json").read_text())["evaluated"] if r["chosen"]]
    assert loaded.calibration["report"]["kl"] == chosen["report_kl"] == scores.kl
    unlowered, _, _ = tiny  # the model loaded in float32 without lower_matmuls: the same numbers
    store = ScoreStore(tmp_path / "float32.jsonl")
    assert Evaluator(unlowered, split.report, 32, defaults.batch_size, store, torch.float32).score(candidate) == scores
    assert chosen["report_ppl"] == scores.ppl and chosen["selection_kl"] != scores.kl
    assert loaded.calibration["tokens"] == {"calibration": 128, "selection": 128, "report": 128, "sensitivity": 64}


def test_rerun_resumes_from_the_cache(calibrated, tiny_dir, text, capsys):
    before = json.loads((calibrated / "precision_map.json").read_text())
    capsys.readouterr()
    assert cli.main([str(tiny_dir), "--budget", "4.0", "--out", str(calibrated), "--text", str(text), *SMALL]) == 0
    log = capsys.readouterr().out
    assert "[surrogate] cached" in log and "(0 new, the rest from the score store)" in log
    after = json.loads((calibrated / "precision_map.json").read_text())
    for document in (before, after):
        del document["calibration"]["created"]
    assert before == after


def test_second_budget_reuses_the_measurements(calibrated, tiny_dir, text, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "b3"
    argv = [str(tiny_dir), "--budget", "3.25", "--out", str(out), "--cache", str(calibrated / ".cache"), "--text",
            str(text), *SMALL]
    assert cli.main(argv) == 0
    assert "[surrogate] cached" in capsys.readouterr().out
    assert PrecisionMap.load(out / "precision_map.json").avg_bits <= 3.25


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
    assert "unknown" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--schemes", "nf4"], capsys)
    short = tmp_path / "short.txt"
    short.write_text("far too short\n" * 3)
    assert "text too short" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--text", str(short)], capsys)
    assert "no valid format option" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--group-sizes", "48"],
                                              capsys)
    # kivi key groups must divide the block size and fit in the window
    assert "no valid format option" in _error([str(tiny_dir), "--budget", "4", "--out", out, "--schemes", "kivi",
                                               "--windows", "16", "--key-group-sizes", "32"], capsys)


def test_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"")
    assert "unsupported architecture" in _error([str(model), "--budget", "4", "--out", str(tmp_path / "o")], capsys)


@pytest.mark.parametrize("preset,described", [
    ("Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml", "per-token groups of 64 channels; no full-precision window"),
    ("Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml", "kivi: keys per channel over 32 positions"),
])
def test_show_imported_preset(preset, described, tmp_path, tiny_dir, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["import-preset", str(PRESET_DIR / preset), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["show", str(out), "--head-size", "128", "--kv-heads", "4"]) == 0
    shown = capsys.readouterr().out
    assert described in shown and "KV bytes/token" in shown and "Qwen2.5-7B-Instruct, 28 layers" in shown
    # a map for another layer count is refused against a model
    assert "layers" in _error(["show", str(out), "--model", str(tiny_dir)], capsys)


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "calibration", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "--budget" in done.stdout and "--windows" in done.stdout


def test_calibration_never_imports_vllm():
    code = ("import sys, calibration.pipeline, calibration.cli, benchmarks.calibration.uniform_formats; "
            "sys.exit('vllm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
