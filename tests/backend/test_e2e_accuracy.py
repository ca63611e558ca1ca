"""End to end, real `vllm serve` on SmolLM2-135M-Instruct: kvtuner maps against `--kv-cache-dtype auto`.

* all-16 map: greedy outputs identical to auto (the pages hold the bf16 values unchanged; only the
  attention kernel differs, so the prompts are clear-margin ones, see the bf16 near-tie pitfall in
  the design notes).
* KV8 and a mixed map of at most 4 average bits: greedy-token agreement and teacher-forced log-prob
  distance to auto within the thresholds below, and right answers to simple questions.
"""

from __future__ import annotations

import math

import pytest
from conftest import MIN_HORIZON, PROMPTS, Server, greedy, kvtuner_args, text_logprobs, write_map

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_LAYERS = 30
# Simple questions and a word the answer must contain.
QUESTIONS = [
    ("The capital of France is", "Paris"),
    ("The largest planet in the solar system is", "Jupiter"),
]
MAPS = {
    "all16": [(16, 16)] * NUM_LAYERS,
    "kv8": [(8, 8)] * NUM_LAYERS,
    # 3.93 average bits: K8V4 on the first two layers, KV4 in the middle, K4V2 on the last six.
    "mixed": [(8, 4)] * 2 + [(4, 4)] * 22 + [(4, 2)] * 6,
}
# (min mean greedy agreement over the first GREEDY_TOKENS tokens, max mean |delta logprob| over TEXT's
# tokens, max perplexity ratio on TEXT), against auto. Why these numbers:
# * the noise floor: the all-16 map stores bf16 K/V unchanged, yet differs from auto by ~0.04 nats
#   mean |delta logprob| (perplexity ratio ~1.00), only because our kernel accumulates in fp32 where
#   vLLM's CPU kernel rounds to bf16. KV8's quantization error (range/255 per group) is below bf16
#   activations' own noise: measured 0.05 nats, ratio 1.0004, agreement 0.99. Thresholds 0.08 / 1.01.
# * ~4 bits on a 135M model is lossy by nature: the calibration measured a held-out perplexity ratio
#   of 1.22 for its best 4-bit map of SmolLM2-135M, and simulation (format.fake_quantize in HF)
#   predicts 1.19 for this mixed map; the server measured 1.15 ratio, 0.42 nats, 0.53 agreement.
#   Thresholds 1.30 / 0.60 / 0.35 pass that and fail any broken page, scale or block mapping, which
#   sends the ratio far above 2 and the answers to noise.
THRESHOLDS = {"kv8": (0.9, 0.08, 1.01), "mixed": (0.35, 0.60, 1.30)}


@pytest.fixture(scope="module", params=list(MAPS))
def kvtuner_server(request, smollm2_dir, logs_dir, tmp_path_factory, auto_reference):
    name = request.param
    path = write_map(tmp_path_factory.mktemp("maps") / f"{name}.json", MAPS[name], model="SmolLM2-135M-Instruct")
    server = Server(smollm2_dir, kvtuner_args(path), logs_dir / f"kvtuner-{name}.log")
    server.name = name
    yield server
    server.stop()


def agreement(a: list[str], b: list[str]) -> float:
    """Fraction of positions before the first differing token."""
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return same / len(a)


def test_map_in_startup_log(kvtuner_server):
    log = kvtuner_server.log()
    assert "kvtuner KV cache" in log and "precision map: --additional-config precision_map" in log


def test_greedy_and_logprobs_close_to_auto(kvtuner_server, auto_reference):
    got = {p: greedy(kvtuner_server, p) for p in PROMPTS}
    ref_lp, lp = auto_reference["logprobs"], text_logprobs(kvtuner_server)
    mean_abs = sum(abs(a - b) for a, b in zip(ref_lp, lp, strict=True)) / len(lp)
    ppl_ratio = math.exp((sum(ref_lp) - sum(lp)) / len(lp))
    ref = auto_reference["greedy"]
    mean_agree = sum(agreement(ref[p]["tokens"], got[p]["tokens"]) for p in PROMPTS) / len(PROMPTS)
    print(f"{kvtuner_server.name}: greedy agreement {mean_agree:.3f}, mean |dlogprob| {mean_abs:.4f}, "
          f"perplexity ratio {ppl_ratio:.4f}")
    if kvtuner_server.name == "all16":
        for p in PROMPTS:
            horizon = ref[p]["horizon"]
            assert horizon >= MIN_HORIZON, f"not a clear-margin prompt: {p!r}"
            assert got[p]["tokens"][:horizon] == ref[p]["tokens"][:horizon], p
        return
    min_agree, max_abs, max_ratio = THRESHOLDS[kvtuner_server.name]
    assert mean_agree >= min_agree
    assert mean_abs <= max_abs
    assert ppl_ratio <= max_ratio


def test_simple_questions(kvtuner_server):
    for prompt, word in QUESTIONS:
        assert word in kvtuner_server.complete(prompt, max_tokens=12)["text"], prompt
