"""A real `vllm serve` per configuration for the end-to-end tests, on 127.0.0.1.

Servers start with --enforce-eager (no inductor warm-up), both cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0),
HF_HUB_OFFLINE=1 and a 1 GiB KV space unless a test asks otherwise; each runs in its own process
group, killed as a group on teardown. Only one server runs at a time: fixtures that start one are
module-scoped (or session-scoped, for the `auto` reference) and stop it before the next starts.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import pydoc_data.topics
from pathlib import Path

import pytest

from benchmarks import server as served
from benchmarks.server import VLLM, capacity_tokens, free_port, serve_command, server_env  # noqa: F401

START_TIMEOUT_S = 420


def _plugin_installed() -> bool:
    return any(e.name == "kvtuner" for e in importlib.metadata.entry_points(group="vllm.general_plugins"))


class Server(served.Server):
    """benchmarks.server.Server that fails the test, with the server's log tail, when it cannot start."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None,
                 eager: bool = True):
        if not VLLM.exists():
            pytest.fail(f"{VLLM} is missing: run `bash scripts/setup.sh`")
        if not _plugin_installed():
            pytest.fail("the kvtuner plugin is not installed (no vllm.general_plugins entry): run scripts/setup.sh")
        try:
            super().__init__(model, args, log, env, eager, START_TIMEOUT_S)
        except served.ServerError as err:
            pytest.fail(str(err))


def logged_capacity_tokens(log: str) -> int:
    """vLLM's own 'CPU KV cache size: N tokens' line."""
    tokens = capacity_tokens(log)
    assert tokens is not None, "no 'KV cache size' line in the server log"
    return tokens


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


def write_map(path: Path, pairs: list[tuple[int, int]], group_size: int = 64, model: str | None = None,
              **options) -> Path:
    """A precision map file; `options` are the v2 fields (scheme, key_group_size, residual_length)."""
    data = {"format": "kvtuner-precision-map/v2", "num_layers": len(pairs), "group_size": group_size,
            "layers": [{"key_bits": k, "value_bits": v} for k, v in pairs], **options}
    if model:
        data["model"] = model
    path.write_text(json.dumps(data))
    return path


def kvtuner_args(map_path: Path) -> list[str]:
    return ["--kv-cache-dtype", "kvtuner", "--additional-config",
            json.dumps({"kvtuner": {"precision_map": str(map_path)}})]


# Clear-margin completions: auto's greedy continuation has no near-tie in its first tokens
# ("def fibonacci(n):" and "Monday, Tuesday, Wednesday," were dropped: near-ties in their first tokens).
PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "One, two, three, four,",
    "The opposite of hot is",
]
GREEDY_TOKENS = 12
# all-16 vs auto is compared up to auto's first near-tie: a top-2 log-prob gap under this many
# nats, which bf16 rounding differences between two correct attention kernels can flip.
CLEAR_MARGIN = 0.3
MIN_HORIZON = 4
# Teacher-forced text: ~400 tokens of English that ships with CPython.
TEXT = pydoc_data.topics.topics["assert"][:1600]


def greedy(server: Server, prompt: str) -> dict:
    """Greedy tokens, and how many of them come before the first near-tie."""
    logprobs = server.complete(prompt, max_tokens=GREEDY_TOKENS, logprobs=2)["logprobs"]
    margins = [margin(top) for top in logprobs["top_logprobs"]]
    horizon = next((i for i, m in enumerate(margins) if m < CLEAR_MARGIN), len(margins))
    return {"tokens": logprobs["tokens"], "horizon": horizon}


def margin(top: dict[str, float]) -> float:
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else math.inf


def text_logprobs(server: Server) -> list[float]:
    """Log-prob of each token of TEXT given its prefix (teacher forcing)."""
    choice = server.complete(TEXT, max_tokens=1, prompt_logprobs=0, return_token_ids=True)
    ids = choice["prompt_token_ids"]
    out = []
    for token_id, entry in zip(ids[1:], choice["prompt_logprobs"][1:], strict=True):
        out.append(entry[str(token_id)]["logprob"])
    return out

# Decode vs prefill on identical tokens: prompts long enough that every layer's window (32 or 64 positions)
# has older, packed positions behind it, and continuations long enough to complete a kivi key group.
DECODE_PROMPTS = [pydoc_data.topics.topics[topic][:600] for topic in ("assignment", "exceptions", "import")]
DECODE_TOKENS = 48


def decode_vs_prefill(server: Server) -> list[float]:
    """|log-prob from decode - log-prob from prefill| of each greedily generated token after the first.

    A greedy continuation's log-probs come from the decode path (one query row per step); the same tokens
    sent back as a prompt with prompt_logprobs go through the prefill path in one chunk (vLLM reads no
    prefix cache for a request that asks for prompt log-probs). The first token's log-prob comes from the
    prompt's own prefill in both, so it is left out."""
    gaps = []
    for prompt in DECODE_PROMPTS:
        decoded = server.complete(prompt, max_tokens=DECODE_TOKENS, logprobs=0, ignore_eos=True,
                                  return_token_ids=True)
        prompt_ids, generated = decoded["prompt_token_ids"], decoded["token_ids"]
        prefilled = server.complete(prompt_ids + generated, max_tokens=1, prompt_logprobs=0)["prompt_logprobs"]
        for i in range(1, len(generated)):
            entry = prefilled[len(prompt_ids) + i][str(generated[i])]
            gaps.append(abs(decoded["logprobs"]["token_logprobs"][i] - entry["logprob"]))
    return gaps


@pytest.fixture(scope="session")
def auto_reference(smollm2_dir, logs_dir):
    """`--kv-cache-dtype auto` greedy outputs, teacher-forced log-probs and log, from one server."""
    server = Server(smollm2_dir, [], logs_dir / "auto.log")
    try:
        return {
            "greedy": {p: greedy(server, p) for p in PROMPTS},
            "logprobs": text_logprobs(server),
            "decode_vs_prefill": decode_vs_prefill(server),
            "log": server.log(),
        }
    finally:
        server.stop()
