"""kvtuner-calibrate: search a model's per-layer KV precision map, and handle maps.

    kvtuner-calibrate MODEL_DIR --budget 4.0 --out OUT_DIR [--text FILE ...] [--group-size 64] ...
    kvtuner-calibrate import-preset PRESET.yaml --group-size 64 --out map.json [--model NAME]
    kvtuner-calibrate export-preset map.json --out PRESET.yaml
    kvtuner-calibrate show MAP [--model MODEL_DIR]

Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibration.errors import CalibrationError
from calibration.options import Options, check_options

COMMANDS = ("import-preset", "export-preset", "show")


def calibrate_parser() -> argparse.ArgumentParser:
    d = Options(model_dir="", budget=0, out_dir="")
    p = argparse.ArgumentParser(
        prog="kvtuner-calibrate",
        description="Search a per-layer (key bits, value bits) map for MODEL_DIR under an average-bits budget. "
        f"Other commands: {', '.join(COMMANDS)} (kvtuner-calibrate COMMAND -h).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face causal LM folder")
    p.add_argument("--budget", type=float, required=True, help="max average bits, (K + V) / 2 over layers, in [2, 16]")
    p.add_argument("--out", dest="out_dir", required=True, help="output folder (also holds the resumable cache)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE",
                   help="calibration text: plain text or JSONL with a 'text' field (default: pydoc_data.topics)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="quantization group; the server's (default 64)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"calibration tokens (default {d.tokens})")
    p.add_argument("--heldout-tokens", type=int, default=d.heldout_tokens, help=f"default {d.heldout_tokens}")
    p.add_argument("--sensitivity-tokens", type=int, default=d.sensitivity_tokens,
                   help=f"tokens of the per-layer KL pass, the slowest step (default {d.sensitivity_tokens})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"window length (default {d.seq_len})")
    p.add_argument("--groups", type=int, default=d.groups, help=f"layer clusters searched (default {d.groups})")
    p.add_argument("--verify", type=int, default=d.verify, help=f"front maps re-scored for real (default {d.verify})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores not busy with other work)")
    return p


def maps_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtuner-calibrate", description="Precision map utilities.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-preset", help="KVTuner preset YAML -> v1 precision map JSON")
    imp.add_argument("preset")
    imp.add_argument("--group-size", type=int, default=64)
    imp.add_argument("--model", default=None, help="model name for the map (default: from the file name)")
    imp.add_argument("--out", required=True)
    exp = sub.add_parser("export-preset", help="precision map (v1 or preset) -> KVTuner preset YAML")
    exp.add_argument("map")
    exp.add_argument("--out", required=True)
    show = sub.add_parser("show", help="average bits, pairs per layer, KV bytes per token, capacity vs unquantized")
    show.add_argument("map")
    show.add_argument("--model", default=None, help="model folder for the KV geometry (head size, KV heads)")
    show.add_argument("--head-size", type=int, default=64)
    show.add_argument("--kv-heads", type=int, default=1)
    return p


def run_maps(args: argparse.Namespace) -> None:
    from kvtuner_vllm.precision_map import PrecisionMapError

    try:
        _run_maps(args)
    except PrecisionMapError as err:
        raise CalibrationError(str(err)) from None


def _run_maps(args: argparse.Namespace) -> None:
    from kvtuner_vllm.precision_map import PrecisionMap

    if args.command == "import-preset":
        loaded = PrecisionMap.load(args.preset, group_size=args.group_size)
        if args.model:
            loaded.model = args.model
        loaded.save(args.out)
        print(f"{args.out}: {loaded.num_layers} layers, average bits {loaded.avg_bits:.2f}")
    elif args.command == "export-preset":
        Path(args.out).write_text(PrecisionMap.load(args.map).to_kvtuner_yaml())
        print(f"{args.out}: written")
    else:
        show(PrecisionMap.load(args.map), args)


def show(loaded, args: argparse.Namespace) -> None:
    import torch

    from calibration import model as model_io

    head_size, kv_heads, dtype = args.head_size, args.kv_heads, torch.bfloat16
    if args.model:
        info = model_io.model_info(model_io.read_config(args.model), torch.bfloat16, Path(args.model).name)
        head_size, kv_heads = info.head_dim, info.num_kv_heads
        loaded.check_model(info.num_layers, head_size, source=args.map)
    print(f"{args.map}: {loaded.model or 'model not named'}, {loaded.num_layers} layers, "
          f"head size {head_size}, {kv_heads} KV heads")
    print(loaded.summary(head_size, kv_heads, dtype))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS:
            run_maps(maps_parser().parse_args(argv))
        else:
            opts = Options(**vars(calibrate_parser().parse_args(argv)))
            check_options(opts)  # before the heavy imports: a bad budget fails at once
            from calibration.pipeline import Run

            Run(opts).run()
    except CalibrationError as err:
        print(f"kvtuner-calibrate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvtuner-calibrate: interrupted; rerun the same command to resume from the cache", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
