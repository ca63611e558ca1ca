"""kvtuner-calibrate: search a model's per-layer KV precision map, and handle maps.

    kvtuner-calibrate MODEL_DIR --budget 4.0 --out OUT_DIR [--cache DIR] [--text FILE ...] ...
    kvtuner-calibrate import-preset PRESET.yaml [--group-size 64] --out map.json [--model NAME]
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
        description="Search a per-layer (key bits, value bits) map and its format options (scheme, group size, "
        "window) for MODEL_DIR under an average-bits budget: searched on calibration text, chosen on selection text "
        "and reported on a third text (three disjoint ranges of the text). "
        f"Other commands: {', '.join(COMMANDS)} (kvtuner-calibrate COMMAND -h).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face causal LM folder")
    p.add_argument("--budget", type=float, required=True,
                   help="max average code bits, (K + V) / 2 over layers, in [2, 16]")
    p.add_argument("--out", dest="out_dir", required=True, help="output folder")
    p.add_argument("--cache", dest="cache_dir", default=None,
                   help="measurement and score cache (default OUT/.cache); give several budgets the same one to reuse "
                   "measurements")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE",
                   help="text: plain text or JSONL with a 'text' field (default: pydoc_data.topics); its first 60%% "
                   "is calibration text, the next 20%% selection text, the last 20%% report text")
    fmt = p.add_argument_group("format options searched (one per map)")
    fmt.add_argument("--schemes", nargs="+", default=d.schemes, help=f"default {' '.join(d.schemes)}")
    fmt.add_argument("--group-sizes", nargs="+", type=int, default=d.group_sizes, help="channels per group")
    fmt.add_argument("--windows", nargs="+", type=int, default=d.windows,
                     help="full-precision window lengths R (residual_length; 0: none)")
    fmt.add_argument("--key-group-sizes", nargs="+", type=int, default=d.key_group_sizes,
                     help="kivi: positions per key group")
    fmt.add_argument("--block-size", type=int, default=d.block_size, help="the server's block size (default 128)")
    dat = p.add_argument_group("data")
    dat.add_argument("--tokens", type=int, default=d.tokens, help=f"calibration tokens (default {d.tokens})")
    dat.add_argument("--selection-tokens", type=int, default=d.selection_tokens,
                     help=f"tokens the map is chosen on (default {d.selection_tokens})")
    dat.add_argument("--report-tokens", type=int, default=d.report_tokens,
                     help=f"tokens the report's numbers are measured on (default {d.report_tokens})")
    dat.add_argument("--sensitivity-tokens", type=int, default=d.sensitivity_tokens,
                     help=f"tokens of the surrogate's measurements (default {d.sensitivity_tokens})")
    dat.add_argument("--seq-len", type=int, default=d.seq_len, help=f"window length (default {d.seq_len})")
    srch = p.add_argument_group("search")
    srch.add_argument("--formats", type=int, default=d.formats,
                      help=f"format options searched, the best by the surrogate (default {d.formats}) and each "
                      "scheme's best")
    srch.add_argument("--band", type=float, default=d.band,
                      help=f"search maps with average bits in [budget - band, budget] (default {d.band})")
    srch.add_argument("--seeds-per-format", type=int, default=d.seeds_per_format)
    srch.add_argument("--pop-size", type=int, default=d.pop_size)
    srch.add_argument("--offspring", type=int, default=d.offspring, help="new maps per generation")
    srch.add_argument("--generations", type=int, default=d.generations)
    srch.add_argument("--verify", type=int, default=d.verify,
                      help=f"front maps scored on the selection text (default {d.verify})")
    srch.add_argument("--seed", type=int, default=d.seed)
    mach = p.add_argument_group("machine")
    mach.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    mach.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"],
                      help="dtype of the forward passes (default float32: bf16 rounding noise would swamp small KLs)")
    mach.add_argument("--matmul-dtype", default=d.matmul_dtype, choices=["auto", "bfloat16", "float16", "float32"],
                      help="dtype of the decoder layers' matrix products (default auto: bfloat16 for a bfloat16 "
                      "checkpoint, whose weights it holds exactly, ~2.7x faster on AVX512-BF16 CPUs; the residual "
                      "stream, attention and the vocabulary projection stay in --dtype)")
    mach.add_argument("--batch-size", type=int, default=d.batch_size)
    mach.add_argument("--state-mb", type=int, default=d.state_mb, help="memory for hidden states kept by map prefix")
    mach.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores not busy with other work)")
    return p


def maps_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtuner-calibrate", description="Precision map utilities.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-preset", help="KVTuner preset YAML -> v2 precision map JSON (the scheme from the "
                         "file name: <model>_pertoken_... or <model>_kivi_..., with KVTuner's kivi settings)")
    imp.add_argument("preset")
    imp.add_argument("--group-size", type=int, default=64, help="group size of a pertoken preset (default 64)")
    imp.add_argument("--model", default=None, help="model name for the map (default: from the file name)")
    imp.add_argument("--out", required=True)
    exp = sub.add_parser("export-preset", help="precision map (v1, v2 or preset) -> KVTuner preset YAML (the bits; "
                         "KVTuner's format names the scheme in the file name)")
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
        print(f"{args.out}: {loaded.num_layers} layers, average bits {loaded.avg_bits:.2f}, {loaded.describe_format()}")
    elif args.command == "export-preset":
        loaded = PrecisionMap.load(args.map)
        Path(args.out).write_text(loaded.to_kvtuner_yaml())
        scheme = "kivi" if loaded.scheme == "kivi" else "pertoken"
        print(f"{args.out}: written ({loaded.describe_format()}; KVTuner names the scheme in the file name: "
              f"<model>_{scheme}_KVTuner<bits>_<n>.yaml)")
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
