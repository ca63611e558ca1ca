"""Quality of what the server computes: vLLM with each KV cache configuration, same model.

Every configuration runs in its own process through vLLM's engine (`vllm.LLM`, the engine
`vllm serve` wraps, with our backend for kvtuner) on a bundled model (SmolLM2-135M-Instruct by
default, `--bundled qwen2.5-coder-1.5b`) or any `--model` folder:

- teacher-forced log-probs (`prompt_logprobs`) over held-out text windows: perplexity,
  top-1 agreement with `auto`, and KL(auto || config) over auto's top-k tokens. The
  quantized cache is exercised here because the kvtuner backend writes a step's K/V
  into the packed cache before attention and every query, prefill included, reads the
  packed cache (kvtuner_vllm/format.py, "Attention semantics"); vLLM's CPU attention
  likewise reads its fp8 cache during prefill.
- greedy continuations of prompts: token agreement with `auto` (matching prefix length).
  The decode path over long contexts has its own benchmark (benchmarks/decode_path.py).
- answers to a small offline question set with known answers.
- KV capacity in tokens from the engine's own accounting, at the same KV memory.

Held-out text: licence texts that ship with Debian (/usr/share/common-licenses), which
the calibration never sees (it calibrates on Python's pydoc topics).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, repo_relative, write_json
from benchmarks.maps import KVConfig, select_configs, write_benchmark_maps
from benchmarks.server import capacity_tokens, server_env

HELDOUT_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1")
LICENSES = Path("/usr/share/common-licenses")
TOP_K = 20
# max_model_len, and so the request length vLLM's capacity count assumes (each request also holds
# its window rings: one block per running request for SmolLM2's maps with a window).
CAPACITY_REQUEST_TOKENS = 2048
QUESTIONS = Path(__file__).with_name("data") / "questions.jsonl"
GREEDY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
)


@dataclass(frozen=True)
class Settings:
    windows: int
    window_tokens: int
    greedy_tokens: int
    kv_space_gib: int = 1


QUICK = Settings(windows=4, window_tokens=256, greedy_tokens=48)
FULL = Settings(windows=16, window_tokens=512, greedy_tokens=48)


def heldout_windows(tokenizer, settings: Settings) -> list[list[int]]:
    text = "\n\n".join((LICENSES / name).read_text() for name in HELDOUT_FILES)
    ids = tokenizer(text)["input_ids"]
    need = settings.windows * settings.window_tokens
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens, {need} needed: lower --windows")
    return [ids[i * settings.window_tokens : (i + 1) * settings.window_tokens] for i in range(settings.windows)]


def _engine(model_dir: str, config: KVConfig, settings: Settings):
    from vllm import LLM

    extra = {}
    if config.precision_map:
        extra["additional_config"] = {"kvtuner": {"precision_map": config.precision_map}}
    return LLM(
        model=model_dir,
        kv_cache_dtype=config.kv_cache_dtype,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=CAPACITY_REQUEST_TOKENS,
        max_logprobs=TOP_K,
        seed=0,
        **extra,
    )


def _teacher_forced(llm, windows: list[list[int]]) -> list[list[dict[int, float]]]:
    """Per window, per position (from the 2nd token), {token id: logprob} of the top-k plus the actual token."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=TOP_K, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    return [[{t: lp.logprob for t, lp in pos.items()} for pos in out.prompt_logprobs[1:]] for out in outputs]


def _greedy(llm, tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    outputs = llm.generate(list(GREEDY_PROMPTS), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _answers(llm) -> list[str]:
    from vllm import SamplingParams

    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    messages = [[{"role": "user", "content": q["question"]}] for q in questions]
    outputs = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def run_one(model_dir: str, config: KVConfig, settings: Settings) -> dict:
    """Everything measured for one configuration (runs inside its own process)."""
    started = time.perf_counter()
    llm = _engine(model_dir, config, settings)
    windows = heldout_windows(llm.get_tokenizer(), settings)
    return {
        "config": asdict(config),
        "windows": windows,
        "logprobs": [[{str(t): lp for t, lp in pos.items()} for pos in w] for w in _teacher_forced(llm, windows)],
        "greedy": _greedy(llm, settings.greedy_tokens),
        "answers": _answers(llm),
        "seconds": time.perf_counter() - started,
    }


# -- metrics against the `auto` run ----------------------------------------------------------


def perplexity(run: dict) -> float:
    total, count = 0.0, 0
    for window, positions in zip(run["windows"], run["logprobs"]):
        for token, pos in zip(window[1:], positions):
            total -= pos[str(token)]
            count += 1
    return math.exp(total / count)


def kl_and_top1(reference: dict, run: dict) -> tuple[float, float]:
    """Mean KL(ref || run) over ref's top-k tokens, and how often both rank the same token first.

    A token outside run's top-k gets run's k-th log-prob, an upper bound on its true value,
    so the KL reported is a lower bound of the top-k KL.
    """
    kl_sum, same_top1, count = 0.0, 0, 0
    for ref_window, run_window in zip(reference["logprobs"], run["logprobs"]):
        for ref_pos, run_pos in zip(ref_window, run_window):
            ref_top = sorted(ref_pos.items(), key=lambda kv: -kv[1])[:TOP_K]
            run_top = sorted(run_pos.items(), key=lambda kv: -kv[1])[:TOP_K]
            floor = run_top[-1][1]
            kl_sum += sum(math.exp(lp) * (lp - run_pos.get(t, floor)) for t, lp in ref_top)
            same_top1 += ref_top[0][0] == run_top[0][0]
            count += 1
    return kl_sum / count, same_top1 / count


def greedy_agreement(reference: dict, run: dict) -> float:
    """Mean fraction of each greedy continuation that matches auto's before the first difference."""
    fractions = []
    for ref, out in zip(reference["greedy"], run["greedy"]):
        prefix = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
        fractions.append(prefix / max(len(ref), 1))
    return sum(fractions) / len(fractions)


def accuracy(run: dict) -> float:
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    correct = sum(
        any(a.lower() in answer.lower() for a in q["answers"]) for q, answer in zip(questions, run["answers"])
    )
    return correct / len(questions)


def summarize(runs: list[dict]) -> list[dict]:
    reference = next(r for r in runs if r["config"]["kv_cache_dtype"] == "auto")
    rows = []
    for run in runs:
        kl, top1 = kl_and_top1(reference, run)
        rows.append(
            {
                **run["config"],
                "precision_map": repo_relative(run["config"]["precision_map"]),
                "ppl": perplexity(run),
                "kl_topk": kl,
                "top1_agreement": top1,
                "greedy_agreement": greedy_agreement(reference, run),
                "qa_accuracy": accuracy(run),
                "kv_capacity_tokens": run["kv_capacity_tokens"],
                "capacity_vs_auto": run["kv_capacity_tokens"] / reference["kv_capacity_tokens"],
                "seconds": run["seconds"],
            }
        )
    return rows


# -- orchestration -------------------------------------------------------------------------------


def _run_in_subprocess(model_dir: str, config: KVConfig, settings: Settings, out: Path) -> dict:
    """A fresh process per engine: vLLM CPU spawns workers and holds its KV pool until exit. The
    capacity is vLLM's own count from EngineCore's log (max concurrency x max_model_len: it charges
    each request the window rings it holds)."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--one", json.dumps(asdict(config)),
           "--model", model_dir, "--settings", json.dumps(asdict(settings)), "--out", str(out)]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=server_env(VLLM_CPU_KVCACHE_SPACE=str(settings.kv_space_gib)))
    run = json.loads(out.read_text())
    run["kv_capacity_tokens"] = capacity_tokens(log.stdout + log.stderr)
    return run


def main(argv: list[str] | None = None) -> None:
    from kvtuner_vllm import bundled_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled", default="smollm2", choices=sorted(bundled_models.MODELS),
                        help="the bundled model to measure (default smollm2)")
    parser.add_argument("--model", help="an HF model folder instead of a bundled model")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="only these configurations (names as in the table, e.g. 'fp8 (vLLM)' 'v2 KV4'); auto "
                        "and the model's calibrated maps (KVTuner rows) always run")
    parser.add_argument("--quick", action="store_true", help="fewer windows and tokens (<= 10 min on 2 cores)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # child process: one configuration
        result = run_one(args.model, KVConfig(**json.loads(args.one)), Settings(**json.loads(args.settings)))
        Path(args.out).write_text(json.dumps(result))
        return

    model_dir = args.model or str(bundled_models.materialize(args.bundled))
    model = Path(model_dir).name
    settings = QUICK if args.quick else FULL
    work = RESULTS_DIR / "quality_runs" / model
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    configs = select_configs(write_benchmark_maps(model_dir, work / "maps"), args.configs)
    runs = []
    for config in configs:
        print(f"[quality] {config.name} ...", flush=True)
        runs.append(_run_in_subprocess(model_dir, config, settings, work / f"{config.name.replace(' ', '_')}.json"))
    rows = summarize(runs)
    command = " ".join(["python -m benchmarks.quality", *(["--quick"] if args.quick else []),
                        *([f"--bundled {args.bundled}"] if not args.model and args.bundled != "smollm2" else []),
                        *(["--configs", *(shlex.quote(c) for c in args.configs)] if args.configs else [])])
    result = {"machine": machine_info(), "settings": asdict(settings), "model": model,
              "wall_seconds": time.perf_counter() - started, "rows": rows, "command": command}
    path = write_json(f"quality-{model}", result)
    plot(rows, path.with_suffix(".png"), model)
    print(json.dumps(rows, indent=2))


MARKERS = {"v1": "x", "v2": "o", "v2 kivi": "^", "KVTuner": "*"}


def _family(name: str) -> str:
    """A row's curve: the map variant of a uniform row, "KVTuner" for calibrated maps, else the name."""
    if name.startswith("KVTuner"):
        return "KVTuner"
    return name.rsplit(" ", 1)[0] if name.startswith("v") else name


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(_family(row["name"]), []).append(row)
    for ax, metric, label in ((axes[0], "ppl", "held-out perplexity"), (axes[1], "kl_topk", "KL to auto (top-20)")):
        for family, members in families.items():
            members = sorted(members, key=lambda r: r["avg_bits"])
            ax.plot([r["avg_bits"] for r in members], [r[metric] for r in members], marker=MARKERS.get(family, "s"),
                    linestyle="-" if family in MARKERS and family != "KVTuner" else "none", label=family,
                    markersize=11 if family == "KVTuner" else 6)
            for r in members:
                ax.annotate(r["name"].removeprefix(family).strip() or r["name"], (r["avg_bits"], r[metric]),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("average KV bits (codes)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model} served by vLLM: quality vs KV bits "
                 "(v1: no window; v2: 32-position window, G64; v2 kivi, KVTuner: kivi keys, G32, 64-position window)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
