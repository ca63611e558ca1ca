"""Does multiplying in bfloat16 change what calibration measures? The same maps scored as
`kvtuner-calibrate` scores them (its windows and score stores), once with every product in float32
and once with the decoder layers' products in bfloat16 (`--matmul-dtype auto` on a bf16 checkpoint),
with the time of one evaluation in each mode.

    python -m benchmarks.calibration.matmul_dtype MODEL_DIR --cache DIR --map RUN/precision_map.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from benchmarks.common import machine_info
from calibration.estimate import MapUnderTest
from calibration.options import Options
from calibration.pipeline import Run
from kvtuner_vllm.precision_map import PrecisionMap

HERE = Path(__file__).resolve().parent
# (key bits, value bits, format options): uniform maps around 4 bits in both schemes, beside the calibrated map
UNIFORM = [(4, 4, {"scheme": "kivi", "key_group_size": 32, "residual_length": 64}),
           (4, 2, {"scheme": "kivi", "key_group_size": 32, "residual_length": 64}),
           (4, 4, {"residual_length": 64}),
           (8, 8, {"residual_length": 32})]


def maps(model_dir: str, chosen: Path) -> list[tuple[str, PrecisionMap]]:
    layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    found = [("calibrated map", PrecisionMap.load(chosen))]
    for k, v, options in UNIFORM:
        pmap = PrecisionMap.uniform(layers, k, v, 32, format="kvtuner-precision-map/v2", **options)
        found.append((f"uniform {pmap.layers[0].label} ({MapUnderTest.of(pmap).option.label})", pmap))
    return found


def score(model_dir: str, cache: str, matmul: str, named: list[tuple[str, PrecisionMap]]) -> dict:
    """Calibration-text scores of each map and the mean seconds of the evaluations this process computed."""
    run = Run(Options(model_dir=model_dir, budget=4.0, out_dir=cache, cache_dir=cache, matmul_dtype=matmul))
    run.setup()
    _ = run.calibration.unquantized  # the reference pass, outside the timed evaluations
    started, before = time.perf_counter(), run.calibration.computed
    scores = {name: run.calibration.score(MapUnderTest.of(pmap)).as_dict() for name, pmap in named}
    computed = run.calibration.computed - before
    seconds = (time.perf_counter() - started) / computed if computed else None
    del run
    gc.collect()
    return {"scores": scores, "seconds_per_new_evaluation": seconds, "new_evaluations": computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--cache", required=True, help="a calibration cache (scores are read from and added to it)")
    parser.add_argument("--map", type=Path, required=True, help="a calibrated precision_map.json of the model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    named = maps(args.model_dir, args.map)
    modes = {matmul: score(args.model_dir, args.cache, matmul, named) for matmul in ("float32", "auto")}
    rows = [{"map": name, "kl_float32": modes["float32"]["scores"][name]["kl"],
             "kl_bf16_products": modes["auto"]["scores"][name]["kl"],
             "ppl_float32": modes["float32"]["scores"][name]["ppl"],
             "ppl_bf16_products": modes["auto"]["scores"][name]["ppl"]} for name, _ in named]
    model = Path(args.model_dir).resolve().name
    out = args.out or HERE / f"matmul-dtype-{model}.json"
    out.write_text(json.dumps({"model": model, "machine": machine_info(), "text": "calibration text (1024 tokens)",
                               "rows": rows, "seconds_per_evaluation": {
                                   m: modes[m]["seconds_per_new_evaluation"] for m in modes}}, indent=1) + "\n")
    for row in rows:
        print(f"{row['map']:<45} KL fp32 {row['kl_float32']:.5f}  bf16 products {row['kl_bf16_products']:.5f}  "
              f"({row['kl_bf16_products'] / row['kl_float32'] - 1:+.1%})")
    print(out)


if __name__ == "__main__":
    main()
