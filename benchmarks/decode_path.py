"""The decode path, which most served tokens take, through vLLM: greedy continuations of long
held-out contexts, for each KV cache configuration.

    python -m benchmarks.decode_path [--bundled qwen2.5-coder-1.5b] [--configs NAME ...]

Each prompt is the first `--context` tokens of a held-out window (the quality benchmark's Debian
licence texts), long enough that the continuation attends mostly to packed positions, not only to
the full-precision window; `--tokens` greedy tokens follow. Per configuration (its own process,
`vllm.LLM`):
- auto's view: the continuation teacher-forced through an `auto` engine: top-1 agreement (the
  decoded token is auto's first choice) and regret (auto's best log-prob minus the decoded
  token's, nats);
- decode vs prefill: the decoded tokens' log-probs as decoded, against the same prompt +
  continuation sent back as one prompt through the same cache (prompt_logprobs; vLLM reads no
  prefix cache for them): mean and p99 of |difference|, which only rounding may make non-zero.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, repo_relative, write_json
from benchmarks.maps import KVConfig, select_configs, write_benchmark_maps
from benchmarks.quality import FULL, Settings, _engine, heldout_windows
from benchmarks.server import server_env

PROMPTS = 8


def decode(llm, prompts: list[list[int]], tokens: int) -> list[dict]:
    """Per prompt: its ids, the greedy continuation and each continuation token's log-prob as decoded."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [{"prompt": p, "tokens": list(o.outputs[0].token_ids),
             "decode_logprobs": [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
            for p, o in zip(prompts, outputs)]


def prefilled(llm, sequences: list[dict]) -> list[dict]:
    """Each prompt + continuation sent back as one prompt: per continuation position, the log-prob of the token
    that was decoded and the best log-prob, from prefill."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s["prompt"] + s["tokens"]) for s in sequences], params,
                           use_tqdm=False)
    scored = []
    for sequence, out in zip(sequences, outputs):
        positions = out.prompt_logprobs[len(sequence["prompt"]):]
        scored.append({"logprobs": [pos[t].logprob for t, pos in zip(sequence["tokens"], positions)],
                       "best": [max(lp.logprob for lp in pos.values()) for pos in positions]})
    return scored


def run_one(model_dir: str, config: KVConfig, context: int, tokens: int) -> dict:
    started = time.perf_counter()
    llm = _engine(model_dir, config, FULL)
    prompts = heldout_windows(llm.get_tokenizer(), Settings(windows=PROMPTS, window_tokens=context, greedy_tokens=0))
    sequences = decode(llm, prompts, tokens)
    return {"config": asdict(config), "sequences": sequences, "own_prefill": prefilled(llm, sequences),
            "seconds": time.perf_counter() - started}


def score_with_auto(model_dir: str, runs: list[dict]) -> list[list[dict]]:
    """Every configuration's continuations teacher-forced through one `auto` engine: per run, `prefilled`."""
    llm = _engine(model_dir, KVConfig("auto", "auto"), FULL)
    flat = prefilled(llm, [sequence for run in runs for sequence in run["sequences"]])
    return [flat[i * PROMPTS:(i + 1) * PROMPTS] for i in range(len(runs))]


def numbers(run: dict, under_auto: list[dict]) -> dict:
    chosen = np.array([lp for scored in under_auto for lp in scored["logprobs"]])
    best = np.array([lp for scored in under_auto for lp in scored["best"]])
    decoded = np.array([lp for sequence in run["sequences"] for lp in sequence["decode_logprobs"]])
    prefill = np.array([lp for scored in run["own_prefill"] for lp in scored["logprobs"]])
    gap = np.abs(decoded - prefill)
    return {"decode_top1_vs_auto": float(np.mean(chosen >= best)), "decode_regret": float(np.mean(best - chosen)),
            "decode_vs_prefill_mean": float(gap.mean()), "decode_vs_prefill_p99": float(np.quantile(gap, 0.99)),
            "decode_tokens": int(gap.size)}


def _child(args: list[str], out: Path) -> None:
    """`python -m benchmarks.decode_path ARGS` in a fresh process (vLLM CPU holds its KV pool until exit)."""
    subprocess.run([sys.executable, "-m", "benchmarks.decode_path", *args, "--out", str(out)], check=True,
                   capture_output=True, text=True, env=server_env())


def main(argv: list[str] | None = None) -> None:
    from kvtuner_vllm import bundled_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled", default="smollm2", choices=sorted(bundled_models.MODELS))
    parser.add_argument("--model", help="an HF model folder instead of a bundled model")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="only these configurations (the quality table's names); auto and the calibrated maps "
                        "always run")
    parser.add_argument("--context", type=int, default=448, help="prompt tokens (default 448)")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    parser.add_argument("--quick", action="store_true", help="256-token prompts, 32 greedy tokens")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--score", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.tokens = 256, 32

    if args.one:
        result = run_one(args.model, KVConfig(**json.loads(args.one)), args.context, args.tokens)
        Path(args.out).write_text(json.dumps(result))
        return
    if args.score:
        Path(args.out).write_text(json.dumps(score_with_auto(args.model, json.loads(Path(args.score).read_text()))))
        return

    model_dir = args.model or str(bundled_models.materialize(args.bundled))
    model = Path(model_dir).name
    work = RESULTS_DIR / "quality_runs" / model / "decode"
    work.mkdir(parents=True, exist_ok=True)
    configs = select_configs(write_benchmark_maps(model_dir, work / "maps"), args.configs)
    started, runs = time.perf_counter(), []
    for config in configs:
        print(f"[decode] {config.name} ...", flush=True)
        out = work / f"{config.name.replace(' ', '_')}.json"
        _child(["--one", json.dumps(asdict(config)), "--model", model_dir, "--context", str(args.context),
                "--tokens", str(args.tokens)], out)
        runs.append(json.loads(out.read_text()))
    print("[decode] every continuation teacher-forced through auto ...", flush=True)
    (work / "sequences.json").write_text(json.dumps(runs))
    _child(["--score", str(work / "sequences.json"), "--model", model_dir], work / "under_auto.json")
    under_auto = json.loads((work / "under_auto.json").read_text())
    rows = [{**run["config"], "precision_map": repo_relative(run["config"]["precision_map"]), **numbers(run, scored),
             "seconds": run["seconds"]}
            for run, scored in zip(runs, under_auto)]
    command = " ".join(["python -m benchmarks.decode_path", *(["--quick"] if args.quick else []),
                        *([f"--bundled {args.bundled}"] if not args.model and args.bundled != "smollm2" else []),
                        *(["--configs", *(shlex.quote(c) for c in args.configs)] if args.configs else [])])
    write_json(f"decode-{model}", {"machine": machine_info(), "model": model, "rows": rows, "command": command,
                                   "prompts": PROMPTS, "context": args.context, "tokens": args.tokens,
                                   "wall_seconds": time.perf_counter() - started})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
