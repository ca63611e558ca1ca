"""Small CUDA cases for compute-sanitizer (scripts/gpu_check.sh runs it under memcheck, racecheck
and synccheck): scenarios of tests/kernels/cuda_emulator/scenarios.py on the real kernels,
each output checked against the format.py references, so a clean sanitizer run is also a
correct one. Exits non-zero on the first difference.

    python scripts/gpu_sanitize.py [--scenarios a,b,...]
    python scripts/gpu_sanitize.py --emulator   # dry run on the CPU: the host emulator instead of a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "kernels")]

from cuda_emulator import binding  # noqa: E402
from cuda_emulator.scenarios import SCENARIOS, TorchOps, run_scenario  # noqa: E402

# Every kernel and path at small sizes: decode split, window with mixed decode + prefill, kivi
# keys, an odd head size, speculative decode with GQA 5.
DEFAULT_SCENARIOS = ["window-mixed", "kivi", "head80-fp16", "spec-decode-gqa5", "decode-split-v1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--emulator", action="store_true", help="run on the host emulator (no GPU needed)")
    args = parser.parse_args()
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")

    if args.emulator:
        library = binding.build(Path(tempfile.mkdtemp(prefix="kvtuner-emulator-")))

        def make_ops(fmt):
            return binding.EmulatorOps(library, fmt)
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_sanitize: no CUDA device", file=sys.stderr)
            return 2

        def make_ops(fmt):
            return TorchOps("cuda", fmt)

    for name in names:
        start = time.perf_counter()
        scenario = SCENARIOS[name]
        run_scenario(make_ops(scenario.fmt), scenario)
        print(f"gpu_sanitize: ok {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
