"""Serving benchmark: vLLM's own `vllm bench serve` (random prompts, bounded request count) against
`vllm serve` on 127.0.0.1 at equal KV memory, for `auto`, vLLM's own quantized KV (`fp8` on CPU;
`int8_per_token_head`, `int4_per_token_head`, `turboquant_k8v4` on CUDA) and kvtuner maps. Two
workloads: short prompts, and realistic ones (1024 in / 128 out); each in a memory-bound setting (KV
space too small for `auto` to hold the concurrent requests) and an ample one.

A shared machine's speed drifts by tens of percent over minutes, so one run per config after
another compares the machine's moods, not the caches. Instead every config's server of a setting is
started (idle servers take no CPU) and the benchmark visits them in turn, `--repeats` rounds, each
round starting with the next config; a table cell is the median over the rounds, and the JSON keeps every round.

    python -m benchmarks.serving.run --quick      # short prompts only, ~15 min on 2 idle CPU cores
    python -m benchmarks.serving.run              # both workloads, ~55 min (long alone: 40 min)

Writes benchmarks/results/serving-<device>[-quick].json and .png (output tok/s, req/s, TTFT/TPOT p50/p99).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.server import VLLM, Server, ServerError, capacity_tokens, server_env
from kvtuner_vllm.precision_map import PrecisionMap

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
METRICS = ["output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms"]


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    num_prompts: int
    concurrency: int
    max_model_len: int
    memory: dict[str, int]  # setting name -> KV cache bytes


# short: bf16 needs 23 KB/token for SmolLM2, so 24 MiB holds 1k tokens, under the 12 concurrent
# requests' 12 x 160; long: 256 MiB holds 11.6k, under 32 x 1152. long-1.5b, for Qwen2.5-Coder-1.5B
# (28 KB/token in bf16) on 2 CPU cores, where a prompt's prefill takes seconds: 96 MiB holds 3.5k tokens,
# under 8 x 1152.
WORKLOADS = {
    "short": Workload(128, 32, 24, 12, 512, {"memory-bound": 24 * MiB, "ample": 1024 * MiB}),
    "long": Workload(1024, 128, 64, 32, 2048, {"memory-bound": 256 * MiB, "ample": 1024 * MiB}),
    "long-1.5b": Workload(1024, 128, 16, 8, 2048, {"memory-bound": 96 * MiB}),
}


def configs(device: str, maps_dir: Path, num_layers: int) -> dict[str, list[str]]:
    """name -> `vllm serve` arguments selecting the KV cache."""
    kv4 = maps_dir / "kv4.json"
    PrecisionMap.uniform(num_layers, 4, 4, group_size=64, residual_length=32).save(kv4)
    quantized = ["fp8"] if device == "cpu" else ["int8_per_token_head", "int4_per_token_head", "turboquant_k8v4"]
    out = {"auto": []}
    out.update({q: ["--kv-cache-dtype", q] for q in quantized})
    out["kvtuner-kv4"] = ["--kv-cache-dtype", "kvtuner", "--additional-config",
                          json.dumps({"kvtuner": {"precision_map": str(kv4)}})]
    # The bundled/calibrated map for the model, when there is one (resolution order as in serving).
    out["kvtuner-preset"] = ["--kv-cache-dtype", "kvtuner"]
    return out


def start(model: Path, args: list[str], workload: Workload, kv_bytes: int, log: Path) -> Server:
    # VLLM_CPU_KVCACHE_SPACE would override --kv-cache-memory-bytes on CPU.
    return Server(model, ["--max-model-len", str(workload.max_model_len), "--kv-cache-memory-bytes", str(kv_bytes),
                          *args], log, env=server_env(VLLM_CPU_KVCACHE_SPACE=""))


def bench(server: Server, model: Path, workload: Workload, seed: int, result: Path) -> dict:
    # A new seed each round: the same prompts again would hit the prefix cache of the round before.
    cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", str(server.port),
           "--model", "model", "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
           "--num-prompts", str(workload.num_prompts), "--max-concurrency", str(workload.concurrency),
           "--ignore-eos", "--num-warmups", "2", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
           "--result-filename", result.name, "--disable-tqdm"]
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # its stderr only on failure: it also prints harmless warnings at exit
        raise RuntimeError(f"vllm bench serve exited with {done.returncode}:\n{done.stderr[-3000:]}")
    data = json.loads(result.read_text())
    return {metric: data.get(metric) for metric in METRICS}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [(w, s) for w, workload in results["workloads"].items() for s in workload["settings"]]
    names = list(next(iter(next(iter(results["workloads"].values()))["settings"].values()))["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, label in zip(axes, ["output_throughput", "p50_ttft_ms", "p50_tpot_ms"],
                                 ["output tok/s", "TTFT p50 (ms)", "TPOT p50 (ms)"], strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [results["workloads"][w]["settings"][s]["runs"].get(name, {}).get(metric) or 0
                      for w, s in settings]
            ax.bar([x + i * width for x in range(len(settings))], values, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], [f"{w}\n{s}" for w, s in settings])
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vllm bench serve, {results['model']} on {results['device']} (equal KV memory per setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def start_servers(model: Path, workload: Workload, names: dict[str, list[str]], kv_bytes: int, work: Path,
                  label: str) -> tuple[dict[str, Server], dict[str, dict]]:
    """Every config's server for one setting; a config whose server fails to start is an error row."""
    servers, errors = {}, {}
    for name, serve_args in names.items():
        print(f"[bench] {label} {name}: starting server ({kv_bytes // MiB} MiB KV)", flush=True)
        try:
            servers[name] = start(model, serve_args, workload, kv_bytes, work / f"{label}-{name}.log")
        except ServerError as err:
            print(f"[bench] {label} {name}: {err}", flush=True)
            errors[name] = {"error": str(err).splitlines()[0]}
    return servers, errors


def round_order(names: list[str], repeat: int) -> list[str]:
    """The configs in round `repeat`'s order: each round starts with the next config."""
    start = repeat % len(names)
    return names[start:] + names[:start]


def summarize(rounds: list[dict]) -> dict:
    """Each metric's median over the rounds, plus every round's output throughput."""
    summary = {metric: statistics.median(r[metric] for r in rounds) for metric in METRICS}
    summary["output_throughput_rounds"] = [r["output_throughput"] for r in rounds]
    return summary


def run_setting(model: Path, workload: Workload, names: dict[str, list[str]], kv_bytes: int, repeats: int,
                work: Path, label: str) -> dict:
    servers, runs = start_servers(model, workload, names, kv_bytes, work, label)
    try:
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        order = list(servers)
        for repeat in range(repeats):
            for name in round_order(order, repeat):
                server = servers[name]
                result = bench(server, model, workload, repeat, work / f"{label}-{name}-{repeat}.json")
                rounds[name].append(result)
                print(f"[bench] {label} {name} round {repeat + 1}/{repeats}: "
                      f"{result['output_throughput']:.1f} out tok/s", flush=True)
        for name, server in servers.items():
            runs[name] = {**summarize(rounds[name]), "kv_capacity_tokens": capacity_tokens(server.log())}
    finally:
        for server in servers.values():
            server.stop()
    return {name: runs[name] for name in names if name in runs}  # the configs' order


def run_workload(model: Path, workload: Workload, names: dict[str, list[str]], only, repeats: int, work: Path,
                 tag: str) -> dict:
    chosen = {name: args for name, args in names.items() if not only or name in only}
    settings = {
        setting: {"kv_cache_bytes": kv_bytes,
                  "runs": run_setting(model, workload, chosen, kv_bytes, repeats, work, f"{tag}-{setting}")}
        for setting, kv_bytes in workload.memory.items()
    }
    return {"workload": asdict(workload), "settings": settings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: the bundled model --bundled)")
    parser.add_argument("--bundled", default="smollm2", help="a bundled model (default smollm2)")
    parser.add_argument("--quick", action="store_true", help="the short-prompt workload only")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--workloads", nargs="*", choices=list(WORKLOADS), help="default: all (short with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the servers (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.model is None:
        from kvtuner_vllm.bundled_models import materialize

        args.model = materialize(args.bundled)
    num_layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = args.workloads or (["short"] if args.quick else ["short", "long"])
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvtuner-bench-"))
    names = configs(device, work, num_layers)
    results = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
               "model": args.model.name, "device": device, "quick": args.quick, "repeats": args.repeats,
               "env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "enforce_eager": True},
               "workloads": {tag: run_workload(args.model, WORKLOADS[tag], names, args.only, args.repeats, work, tag)
                             for tag in chosen}}
    model_tag = "" if args.model.name == "SmolLM2-135M-Instruct" else f"-{args.model.name}"
    stem = args.out / f"serving-{device}{model_tag}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(f"[bench] wrote {stem}.json and .png; server logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
