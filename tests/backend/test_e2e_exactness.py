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
BLOCK = 64
MAP = {"pairs": [(8, 8)] * NUM_LAYERS, "scheme": "kivi", "key_group_size": 16, "residual_length": 32}
# 14 blocks of 64 tokens: each request holds up to 3 pages plus its ring blocks, so at most two or
# three of the six run at once and vLLM must preempt and recompute the others.
NUM_BLOCKS = 14
CHUNK = 48  # token budget per step: prefills are cut into chunks that start mid-block
MAX_TOKENS = 48
MARGIN = 0.2  # nats
LOGPROB_TOL = 0.02  # nats
# ~140-token prompts: two full blocks each, so the repeated requests hit the prefix cache.
PROMPTS = [pydoc_data.topics.topics[topic][:600] for topic in ("assert", "assignment", "async", "atom-identifiers",
                                                                 "atom-literals", "attribute-access")]


@pytest.fixture(scope="module")
def server(smollm2_dir, logs_dir, tmp_path_factory):
    path = write_map(tmp_path_factory.mktemp("maps") / "kivi-kv8.json", **MAP)
    args = kvtuner_args(path) + ["--dtype", "float32", "--block-size", str(BLOCK), "--num-gpu-blocks-override",
                                 str(NUM_BLOCKS), "--max-model-len", "256", "--max-num-batched-tokens", str(CHUNK),
                                 "--max-num-seqs", "8"]
    server = Server(smollm2_dir, args, logs_dir / "kvtuner-exactness.log")
    yield server
    server.stop()


def _run(server: Server, prompt: str) -> dict:
    logprobs = server.complete(prompt, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)["logprobs"]
    return {"tokens": logprobs["tokens"], "logprobs": logprobs["token_logprobs"],
            "margins": [margin(top) for top in logprobs["top_logprobs"]]}


def _same(alone: dict, other: dict) -> None:
    horizon = next((i for i, m in enumerate(alone["margins"]) if m < MARGIN), MAX_TOKENS)
    assert horizon >= 8, f"not a clear-margin prompt (horizon {horizon})"
    assert other["tokens"][:horizon] == alone["tokens"][:horizon]
    gaps = [abs(a - b) for a, b in zip(alone["logprobs"][:horizon], other["logprobs"][:horizon], strict=True)]
    assert max(gaps) <= LOGPROB_TOL, f"log-probs differ by {max(gaps):.4f} nats"


def test_same_tokens_alone_crowded_and_from_the_prefix_cache(server):
    alone = [_run(server, prompt) for prompt in PROMPTS]
    before = server.metrics()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        crowded = list(pool.map(lambda p: _run(server, p), PROMPTS))
    after = server.metrics()
    assert after["vllm:num_preemptions_total"] > before.get("vllm:num_preemptions_total", 0), "nothing was preempted"
    for one, other in zip(alone, crowded, strict=True):
        _same(one, other)
    hits_before = server.metrics().get("vllm:prefix_cache_hits_total", 0)
    again = [_run(server, prompt) for prompt in PROMPTS]
    assert server.metrics()["vllm:prefix_cache_hits_total"] - hits_before >= BLOCK * len(PROMPTS)
    for one, other in zip(alone, again, strict=True):
        _same(one, other)
