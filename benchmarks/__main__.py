"""`python -m benchmarks run [--quick]`: every benchmark, then the README section.
`python -m benchmarks report`: only regenerate the README section from benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

STEPS = ("benchmarks.kernels.attention_steps", "benchmarks.serving.run", "benchmarks.serving.step_profile",
         "benchmarks.quality", "benchmarks.decode_path")


def run(quick: bool) -> None:
    for module in STEPS:
        started = time.perf_counter()
        print(f"[benchmarks] {module}{' --quick' if quick else ''}", flush=True)
        subprocess.run([sys.executable, "-m", module, *(["--quick"] if quick else [])], check=True)
        print(f"[benchmarks] {module}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run every benchmark, then update the README")
    run_parser.add_argument("--quick", action="store_true", help="small settings (quality <= 10 min on 2 cores)")
    commands.add_parser("report", help="regenerate the README's benchmark section")
    args = parser.parse_args()

    from benchmarks.report import update_readme

    if args.command == "run":
        run(args.quick)
    update_readme()


if __name__ == "__main__":
    main()
