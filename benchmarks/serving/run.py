"""Serving benchmark: vLLM's own `vllm bench serve` (random prompts, bounded request count) against
`vllm serve` on 127.0.0.1 at equal KV memory, for `auto`, vLLM's own quantized KV (`fp8` on CPU;
`int8_per_token_head`, `int4_per_token_head`, `turboquant_k8v4` on CUDA) and kvtuner maps, in a
memory-bound setting (KV space too small for `auto` to hold the concurrent requests) and an
ample-memory one. One server at a time; each is killed (its process group) before the next.

    python benchmarks/serving/run.py --quick      # ~15 min on 2 idle CPU cores
    python benchmarks/serving/run.py              # more requests

Writes benchmarks/results/serving-<device>.json and .png (output tok/s, req/s, TTFT/TPOT p50/p99).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kvtuner_vllm.precision_map import PrecisionMap

ROOT = Path(__file__).resolve().parents[2]
VLLM = Path(sys.executable).parent / "vllm"
MiB = 2**20
METRICS = ["output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configs(device: str, maps_dir: Path, num_layers: int) -> dict[str, list[str]]:
    """name -> `vllm serve` arguments selecting the KV cache."""
    kv4 = maps_dir / "kv4.json"
    PrecisionMap.uniform(num_layers, 4, 4, group_size=64).save(kv4)
    quantized = ["fp8"] if device == "cpu" else ["int8_per_token_head", "int4_per_token_head", "turboquant_k8v4"]
    out = {"auto": []}
    out.update({q: ["--kv-cache-dtype", q] for q in quantized})
    out["kvtuner-kv4"] = ["--kv-cache-dtype", "kvtuner", "--additional-config",
                          json.dumps({"kvtuner": {"precision_map": str(kv4)}})]
    # The bundled/calibrated map for the model, when there is one (resolution order as in serving).
    out["kvtuner-preset"] = ["--kv-cache-dtype", "kvtuner"]
    return out


class Server:
    def __init__(self, model: Path, args: list[str], kv_bytes: int, log: Path):
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes on CPU
        cmd = [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "model", "--enforce-eager", "--max-model-len", "512",
               "--kv-cache-memory-bytes", str(kv_bytes), *args]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not healthy after 600 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def capacity_tokens(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if "KV cache size:" in line:
            return int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))
    return None


def bench(server: Server, model: Path, args, result: Path) -> dict:
    cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", str(server.port),
           "--model", "model", "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--ignore-eos",
           "--num-warmups", "2", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
           "--result-filename", result.name, "--disable-tqdm"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    return {metric: data.get(metric) for metric in METRICS}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    names = list(results["settings"][settings[0]]["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in zip(axes, ["output_throughput", "p50_ttft_ms", "p50_tpot_ms"],
                                 ["output tok/s", "TTFT p50 (ms)", "TPOT p50 (ms)"], strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [results["settings"][s]["runs"].get(name, {}).get(metric) or 0 for s in settings]
            ax.bar([x + i * width for x in range(len(settings))], values, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], settings)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vllm bench serve, {results['model']} on {results['device']} (equal KV memory per setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--settings", nargs="*", choices=["memory-bound", "ample"], help="default: both")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.input_len, args.output_len = (128, 32) if args.quick else (256, 128)
    args.num_prompts, args.concurrency = (24, 12) if args.quick else (128, 32)
    if args.model is None:
        from kvtuner_vllm.smollm2 import materialize

        args.model = materialize()
    num_layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # memory-bound: bf16 needs 23 KB/token for SmolLM2, so 24 MiB holds 1k tokens (96 MiB: 4k), under
    # the concurrent requests' 12 x 160 (32 x 384 = 12k) tokens; a ~4-bit cache holds ~3.5x as many.
    settings = {"memory-bound": 24 * MiB if args.quick else 96 * MiB, "ample": 1024 * MiB}
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvtuner-bench-"))
    names = configs(device, work, num_layers)
    results = {"model": args.model.name, "device": device, "quick": args.quick,
               "workload": {k: getattr(args, k) for k in ("input_len", "output_len", "num_prompts", "concurrency")},
               "env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "enforce_eager": True}, "settings": {}}
    for setting, kv_bytes in settings.items():
        if args.settings and setting not in args.settings:
            continue
        runs = {}
        for name, serve_args in names.items():
            if args.only and name not in args.only:
                continue
            log = work / f"{setting}-{name}.log"
            print(f"[bench] {setting} {name}: starting server ({kv_bytes // MiB} MiB KV)", flush=True)
            try:
                server = Server(args.model, serve_args, kv_bytes, log)
            except RuntimeError as err:
                print(f"[bench] {setting} {name}: {err}", flush=True)
                runs[name] = {"error": str(err)}
                continue
            try:
                runs[name] = bench(server, args.model, args, work / f"{setting}-{name}.json")
                runs[name]["kv_capacity_tokens"] = capacity_tokens(log)
            finally:
                server.stop()
            print(f"[bench] {setting} {name}: {runs[name]}", flush=True)
        results["settings"][setting] = {"kv_cache_bytes": kv_bytes, "runs": runs}
    stem = args.out / f"serving-{device}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(f"[bench] wrote {stem}.json and .png; server logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
