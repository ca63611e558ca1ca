"""Where a served step's time goes: vLLM's engine (`vllm.LLM`, the engine `vllm serve` runs, in one
process) generates the long workload's requests under torch's profiler, once per KV cache config and
round, with KV memory enough for every config to hold them all (1 GiB).

Each config runs in a process of its own, `--repeats` rounds, each round starting with the next
config; a config's seconds per part are medians over its rounds. The parts: the attention op, KV
cache writes, linear layers (oneDNN GEMMs), every other torch op, and time outside torch ops
(Python, scheduling, sampling). Shares of the wall time bound what any KV cache can gain: where a
cache holds every request, only its attention and cache writes differ from `auto`'s at ample memory.

    python -m benchmarks.serving.step_profile     # 11-15 min on 2 idle CPU cores (--quick: one round, ~7)

Writes benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_json
from benchmarks.server import server_env
from benchmarks.serving.run import WORKLOADS, configs, round_order

GiB = 2**30
WORKLOAD = WORKLOADS["long"]
NUM_REQUESTS = WORKLOAD.concurrency  # one batch: every request runs at once
PARTS = {
    "attention": ("kvtuner::paged_attention", "_C::cpu_attention_with_kv_cache"),
    "KV cache writes": ("kvtuner::quantize_and_cache", "kvtuner::write_window", "_C::cpu_attn_reshape_and_cache"),
    "linear layers": ("_C::onednn_mm", "_C::weight_packed_linear"),
}


def engine_kwargs(args: list[str]) -> dict:
    """`vllm serve` KV cache arguments (run.configs) as `vllm.LLM` keyword arguments."""
    kwargs = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        kwargs[name] = json.loads(value) if name == "additional_config" else value
    return kwargs


def profile_one(model: str, args: list[str], seed: int) -> dict:
    """One config's generation under the profiler: wall seconds, and seconds per part."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model, enforce_eager=True, max_model_len=WORKLOAD.max_model_len, kv_cache_memory_bytes=GiB,
              enable_prefix_caching=False, **engine_kwargs(args))
    generator = torch.Generator().manual_seed(seed)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 40000, (WORKLOAD.input_len,),
                                                           generator=generator).tolist())
               for _ in range(NUM_REQUESTS)]
    sampling = SamplingParams(max_tokens=WORKLOAD.output_len, ignore_eos=True, temperature=0)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # first-call costs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        llm.generate(prompts, sampling, use_tqdm=False)
        wall = time.perf_counter() - started
    self_s = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    parts = {part: sum(self_s.get(op, 0.0) for op in ops) for part, ops in PARTS.items()}
    if parts["attention"] == 0.0:  # another vLLM's op names: every share would be wrong
        raise RuntimeError(f"none of the attention ops {PARTS['attention']} ran; ops seen: {sorted(self_s)}")
    parts["other torch ops"] = sum(self_s.values()) - sum(parts.values())
    parts["outside torch ops"] = wall - sum(self_s.values())
    return {"wall_s": wall, "parts_s": parts}


def run_one(name: str, args: list[str], model: str, seed: int, log: Path) -> dict:
    env = server_env(VLLM_CPU_KVCACHE_SPACE="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "benchmarks.serving.step_profile", "--one", json.dumps(args),
                               "--model", model, "--seed", str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=out, text=True)
    if done.returncode != 0:  # the log lies in a temporary folder: show its end
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"step profile of {name} failed (exit {done.returncode}); the end of its log:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict]) -> dict:
    wall = statistics.median(r["wall_s"] for r in rounds)
    parts = {part: statistics.median(r["parts_s"][part] for r in rounds) for part in rounds[0]["parts_s"]}
    return {"wall_s": wall, "wall_s_rounds": [r["wall_s"] for r in rounds], "parts_s": parts,
            "output_throughput": NUM_REQUESTS * WORKLOAD.output_len / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configs (default 2)")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--only", nargs="+", help="config names to run (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one config's arguments as JSON
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(profile_one(args.model, json.loads(args.one), args.seed)), flush=True)
        return
    if args.quick:
        args.repeats = 1

    from kvtuner_vllm.bundled_models import materialize

    model = materialize()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        known = configs("cpu", Path(tmp), num_layers)
        unknown = sorted(set(args.only or []) - set(known))
        if unknown:
            parser.error(f"no config named {', '.join(unknown)}; the configs: {', '.join(known)}")
        chosen = {name: cli for name, cli in known.items() if not args.only or name in args.only}
        names = list(chosen)
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in round_order(names, repeat):
                result = run_one(name, chosen[name], str(model), repeat, Path(tmp) / f"{name}-{repeat}.log")
                rounds[name].append(result)
                print(f"[step_profile] round {repeat + 1} {name}: {result['wall_s']:.1f} s, attention "
                      f"{result['parts_s']['attention']:.1f} s", flush=True)
    path = write_json("step_profile", {
        "model": "SmolLM2-135M-Instruct (bf16)", "machine": machine_info(), "repeats": args.repeats,
        "workload": {"input_len": WORKLOAD.input_len, "output_len": WORKLOAD.output_len,
                     "num_requests": NUM_REQUESTS, "kv_cache_bytes": GiB},
        "configs": {name: summarize(rounds[name]) for name in names},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
