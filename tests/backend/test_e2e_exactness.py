"""The serving mechanics are exact: a request gives the same tokens alone, in a crowded batch that
preempts and recomputes it, chunked at other boundaries (chunks start mid-block), and again from the
prefix cache. Real `vllm serve` on SmolLM2-135M-Instruct with a map that exercises every moving part
of format v2: the full-precision window and its rings, kivi key groups completed across steps.

Why this cannot pass or fail by rounding luck: the model runs in fp32, so two batch compositions
differ by fp32 rounding (~1e-7 relative) only. Quantization can amplify that (a value that close to a
rounding boundary flips its code), so the map is 8-bit: a flipped code moves a value by range/255 and
a log-prob by ~1e-3 nats at most, measured at well under 1e-2 here. Tokens are compared up to the
alone run's first top-2 gap under MARGIN (0.2 nats, 20x that) and their log-probs within LOGPROB_TOL.
A broken ring, block table or kivi group changes log-probs by whole nats.
"""

from __future__ import annotations

import pydoc_data.topics
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Server, kvtuner_args, margin, write_map

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_LAYERS = 30
BLOCK = 32
MAP = {"pairs": [(8, 8)] * NUM_LAYERS, "scheme": "kivi", "key_group_size": 16, "residual_length": 32}
# 14 blocks of 32 tokens, one of them vLLM's null block. A request holds 4 ring blocks (fp32 rings of
# 30 layers, 8 per block) and its pages: a ~55-token prompt takes 2 pages (6 blocks with the rings),
# so two requests run at once; 24 tokens later each needs a third page (7 blocks), 14 > 13, so vLLM
# must preempt one and recompute it.
NUM_BLOCKS = 14
CHUNK = 48  # token budget per step: prefills are cut into chunks that start mid-block
MAX_TOKENS = 24
MARGIN = 0.2  # nats
LOGPROB_TOL = 0.02  # nats
# 50-60-token prompts: a full block each, so the repeated requests hit the prefix cache.
PROMPTS = [pydoc_data.topics.topics[topic][:230] for topic in ("assert", "assignment", "async", "atom-identifiers")]


@pytest.fixture(scope="module")
def server(smollm2_dir, logs_dir, tmp_path_factory):
    path = write_map(tmp_path_factory.mktemp("maps") / "kivi-kv8.json", **MAP)
    args = kvtuner_args(path) + ["--dtype", "float32", "--block-size", str(BLOCK), "--num-gpu-blocks-override",
                                 str(NUM_BLOCKS), "--max-model-len", "128", "--max-num-batched-tokens", str(CHUNK),
                                 "--max-num-seqs", "8"]
    server = Server(smollm2_dir, args, logs_dir / "kvtuner-exactness.log")
    yield server
    server.stop()


def _run(server: Server, prompt: str) -> dict:
    logprobs = server.complete(prompt, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)["logprobs"]
    return {"tokens": logprobs["tokens"], "logprobs": logprobs["token_logprobs"],
            "margins": [margin(top) for top in logprobs["top_logprobs"]]}


def _same(alone: dict, other: dict) -> int:
    """Equal tokens up to the alone run's first near-tie; equal log-probs as long as the tokens agree.
    Returns how many tokens agree (log-probs compared)."""
    horizon = next((i for i, m in enumerate(alone["margins"]) if m < MARGIN), MAX_TOKENS)
    assert other["tokens"][:horizon] == alone["tokens"][:horizon]
    agree = next((i for i, (a, b) in enumerate(zip(alone["tokens"], other["tokens"], strict=True)) if a != b),
                 MAX_TOKENS)
    gaps = [abs(a - b) for a, b in zip(alone["logprobs"][:agree], other["logprobs"][:agree], strict=True)]
    assert max(gaps) <= LOGPROB_TOL, f"log-probs differ by {max(gaps):.4f} nats"
    return agree


def test_same_tokens_alone_from_the_prefix_cache_and_crowded(server):
    hits_before = server.metrics().get("vllm:prefix_cache_hits_total", 0)
    alone, again = [], []
    for prompt in PROMPTS:  # each repeated at once, while its blocks are still cached
        alone.append(_run(server, prompt))
        again.append(_run(server, prompt))
    assert server.metrics()["vllm:prefix_cache_hits_total"] - hits_before >= BLOCK * len(PROMPTS)
    before = server.metrics().get("vllm:num_preemptions_total", 0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        crowded = list(pool.map(lambda p: _run(server, p), PROMPTS))
    assert server.metrics()["vllm:num_preemptions_total"] > before, "nothing was preempted"
    compared = [_same(one, other) for one, other in zip(alone * 2, again + crowded, strict=True)]
    # Not vacuous: at fp32 tokens agree wherever the top-2 gap exceeds the rounding noise, i.e. almost always.
    assert sum(compared) >= 0.9 * MAX_TOKENS * len(compared), compared
