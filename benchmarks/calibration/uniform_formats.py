"""Uniform maps under every format option, scored as kvtuner-calibrate scores maps (same windows and
score stores, so a calibration cache answers what it already measured), on the report text: which
scheme, group size, kivi key group and window win, by how much, and what the surrogate predicted.

    python -m benchmarks.calibration.uniform_formats MODEL_DIR --cache DIR [--pairs KV4 K4V2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibration.common import SEARCH_PAIRS, Candidate
from calibration.options import Options
from calibration.pipeline import Run

HERE = Path(__file__).resolve().parent


def measure(model_dir: str, cache: str, labels: list[str]) -> tuple[list[dict], dict]:
    run = Run(Options(model_dir=model_dir, budget=4.0, out_dir=cache, cache_dir=cache))
    setup = run.setup()
    surrogate = run.surrogate(setup)
    pairs = [p for p in SEARCH_PAIRS if p.label in labels]
    candidates = [Candidate.uniform_map(o, p, setup.info.num_layers) for p in pairs for o in setup.options]
    calibration = run.calibration.score_all(candidates)
    reported = run.report.score_all(candidates)
    rows = []
    for candidate, calib, scores in zip(candidates, calibration, reported, strict=True):
        rows.append({"pair": candidate.pairs[0].label, "option": candidate.option.label,
                     **run.geometry.costs(candidate),
                     "predicted_kl": surrogate.predict(candidate.option, candidate.layers),
                     "calibration_kl": calib.kl, "report_kl": scores.kl, "report_ppl": scores.ppl})
    return rows, {"calibration": run.calibration.unquantized.as_dict(), "report": run.report.unquantized.as_dict()}


def markdown(rows: list[dict], unquantized: dict, model: str) -> str:
    base = unquantized["report"]["ppl"]
    lines = [f"# Uniform maps under every format option: {model}", "",
             "Scored like `kvtuner-calibrate` scores maps: every layer's attention is "
             "`kvtuner_vllm.reference.simulated_attention`, float32 forward passes, block size 128, 1024 calibration "
             "tokens (the first 60% of `pydoc_data.topics`) and 2048 report tokens (its last 20%); KL to the "
             "unquantized model in nats. Predicted: the calibration's surrogate. Unquantized report PPL "
             f"{base:.3f}.", "",
             "| pair | option | KV bytes/token | capacity | window ring B/request | predicted KL | calibration KL | "
             "report KL | report PPL vs unquantized |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["pair"], r["report_kl"])):
        lines.append(f"| {r['pair']} | {r['option']} | {r['bytes_per_token']} | {r['capacity_vs_unquantized']:.2f}x | "
                     f"{r['ring_bytes_per_request']:,} | {r['predicted_kl']:.5f} | {r['calibration_kl']:.5f} | "
                     f"{r['report_kl']:.5f} | {100 * (r['report_ppl'] / base - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--cache", required=True, help="the calibration cache (scores are added to it)")
    parser.add_argument("--pairs", nargs="+", default=["KV4", "K4V2"])
    parser.add_argument("--out", default=str(HERE / "uniform-formats.md"))
    args = parser.parse_args()
    rows, unquantized = measure(args.model_dir, args.cache, args.pairs)
    out = Path(args.out)
    out.write_text(markdown(rows, unquantized, Path(args.model_dir).resolve().name))
    out.with_suffix(".json").write_text(json.dumps({"unquantized": unquantized, "uniform": rows}, indent=1) + "\n")
    print(f"{out}: {len(rows)} uniform maps")


if __name__ == "__main__":
    main()
