"""Long-context retrieval through vLLM: can the model still find a 5-digit pass key hidden in filler
text when every layer's keys and values are stored at the map's bits?

    python -m benchmarks.passkey [--bundled qwen2.5-coder-1.5b] [--lengths 4096 8192 16384] [--keys 1]

For each prompt length and depth (15/50/85% of the filler), `--keys` seeded random keys are hidden
as "The pass key is NNNNN. Remember it. NNNNN is the pass key." in a repeated filler; the prompt ends
with "What is the pass key? The pass key is" and the greedy answer (8 tokens) must contain the key
(exact match). Each configuration runs in its own process through vLLM's engine (`vllm.LLM`, eager,
no prefix caching, one prompt at a time so that each prompt's time is its own prefill).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, repo_relative, write_json
from benchmarks.maps import KVConfig, calibrated_configs, select_configs, uniform_config
from benchmarks.server import server_env

PREAMBLE = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.15, 0.50, 0.85)
ANSWER_TOKENS = 8
# The uniform 3-bit map the issue asks for: K4V2 in the format the calibration picks (kivi keys over 32 positions,
# groups of 32, a 64-position window).
THREE_BITS = (4, 2, {"scheme": "kivi", "key_group_size": 32, "residual_length": 64}, 32)


def build_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of at most `length` tokens: the preamble, whole fillers with the needle after `depth` of them,
    then the question."""
    preamble, filler, needle, question = (tokenizer(text, add_special_tokens=False)["input_ids"]
                                          for text in (PREAMBLE, FILLER, NEEDLE.format(key=key), QUESTION))
    count = (length - len(preamble) - len(needle) - len(question)) // len(filler)
    before = round(count * depth)
    return preamble + filler * before + needle + filler * (count - before) + question


def cases(lengths: list[int], keys: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"length": length, "depth": depth, "key": f"{rng.randrange(10000, 100000)}"}
            for length in lengths for depth in DEPTHS for _ in range(keys)]


def run_one(model_dir: str, config: KVConfig, todo: list[dict]) -> list[dict]:
    """Every case through one engine of this configuration (runs inside its own process)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    extra = {}
    if config.precision_map:
        extra["additional_config"] = {"kvtuner": {"precision_map": config.precision_map}}
    longest = max(case["length"] for case in todo)
    llm = LLM(model=model_dir, kv_cache_dtype=config.kv_cache_dtype, dtype="bfloat16", enforce_eager=True,
              max_model_len=longest + 2 * ANSWER_TOKENS, enable_prefix_caching=False, seed=0, **extra)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    results = []
    for case in todo:
        prompt = build_prompt(tokenizer, case["length"], case["depth"], case["key"])
        started = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        answer = out.outputs[0].text
        results.append({**case, "tokens": len(prompt), "answer": answer, "seconds": time.perf_counter() - started,
                        "found": re.search(rf"\b{case['key']}\b", answer) is not None})
    return results


def summarize(config: KVConfig, results: list[dict]) -> dict:
    by_length = {}
    for length in sorted({r["length"] for r in results}):
        mine = [r for r in results if r["length"] == length]
        by_length[str(length)] = {"found": sum(r["found"] for r in mine), "total": len(mine),
                                  "seconds_mean": sum(r["seconds"] for r in mine) / len(mine)}
    return {**asdict(config), "precision_map": repo_relative(config.precision_map), "by_length": by_length,
            "cases": results}


def _run_in_subprocess(model_dir: str, config: KVConfig, todo: list[dict], out: Path, kv_space_gib: int) -> list:
    cmd = [sys.executable, "-m", "benchmarks.passkey", "--one", json.dumps(asdict(config)), "--model", model_dir,
           "--cases", json.dumps(todo), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True,
                   env=server_env(VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib)))
    return json.loads(out.read_text())


def configurations(model_dir: str, work: Path) -> list[KVConfig]:
    return [KVConfig("auto", "auto"), KVConfig("fp8 (vLLM)", "fp8", avg_bits=8.0),
            *calibrated_configs(model_dir), uniform_config(model_dir, work, *THREE_BITS)]


def main(argv: list[str] | None = None) -> None:
    from kvtuner_vllm import bundled_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled", default="qwen2.5-coder-1.5b", choices=sorted(bundled_models.MODELS))
    parser.add_argument("--model", help="an HF model folder instead of a bundled model")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--keys", type=int, default=1, help="keys per length and depth (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-space-gib", type=int, default=2)
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="only these configurations (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # child process: one configuration
        result = run_one(args.model, KVConfig(**json.loads(args.one)), json.loads(args.cases))
        Path(args.out).write_text(json.dumps(result))
        return

    model_dir = args.model or str(bundled_models.materialize(args.bundled))
    model = Path(model_dir).name
    work = RESULTS_DIR / "passkey_runs" / model
    work.mkdir(parents=True, exist_ok=True)
    todo = cases(args.lengths, args.keys, args.seed)
    started = time.perf_counter()
    rows = []
    chosen = select_configs(configurations(model_dir, work), args.configs, keep_baselines=False)
    command = " ".join(["python -m benchmarks.passkey", *([f"--bundled {args.bundled}"] if not args.model else []),
                        "--lengths", *map(str, args.lengths), "--keys", str(args.keys),
                        *(["--configs", *(shlex.quote(c) for c in args.configs)] if args.configs else [])])
    for config in chosen:
        print(f"[passkey] {config.name} ...", flush=True)
        results = _run_in_subprocess(model_dir, config, todo, work / f"{config.name.replace(' ', '_')}.json",
                                     args.kv_space_gib)
        rows.append(summarize(config, results))
        print(f"[passkey] {config.name}: " + ", ".join(f"{length}: {v['found']}/{v['total']} "
                                                       f"({v['seconds_mean']:.0f} s)"
                                                       for length, v in rows[-1]["by_length"].items()), flush=True)
        # written after every configuration: a long run stopped early keeps what it measured
        write_json(f"passkey-{model}", {"machine": machine_info(), "model": model, "rows": rows, "command": command,
                                        "wall_seconds": time.perf_counter() - started, "depths": list(DEPTHS),
                                        "kv_space_gib": args.kv_space_gib})


if __name__ == "__main__":
    main()
