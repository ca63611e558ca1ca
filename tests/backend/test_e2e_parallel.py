"""Tensor and pipeline parallelism (vLLM's CPU backend runs both as processes, one rank per core):
the same map served at size 1, with --tensor-parallel-size 2 (each rank holds one of the tiny
model's two KV heads) and with --pipeline-parallel-size 2 (each stage holds two of its four
layers) gives the same outputs, and each logs its capacity per rank.

fp32 and an 8-bit map with a window, so that size 1 and size 2 differ only by the order of
floating-point sums (the tensor-parallel all-reduce; torch.compile's fused kernels for the pipeline,
which must not run eager) and the rare 8-bit code that such rounding flips: measured at most 4e-3
nats on this random model. A wrong head split, layer range or ring per rank moves log-probs by
whole nats. So: log-probs within LOGPROB_TOL (12x the measured noise), teacher-forced and along the
greedy continuations, whose tokens may part only at a near tie (the tiny random model's top-2 gaps
are mostly under 0.1 nats, so the comparison follows the generated tokens, not a margin horizon).
"""

from __future__ import annotations

import pytest
from conftest import Server, kvtuner_args, margin, server_env, text_logprobs, write_map

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["The capital of France is", "One, two, three, four,", "def fibonacci(n):"]
MAX_TOKENS = 16
LOGPROB_TOL = 0.05  # nats
# One rank per core: vLLM's CPU workers bind their threads by NUMA node unless told where to.
RANKS_ON_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
LAYOUTS = {
    "single": ([], True),
    "tensor2": (["--tensor-parallel-size", "2"], True),
    # vLLM 0.32's CPU worker skips the warm-up that allocates pipeline buffers when eager (refused).
    "pipeline2": (["--pipeline-parallel-size", "2"], False),
}


@pytest.fixture(scope="module")
def outputs(tiny_llama_dir, logs_dir, tmp_path_factory):
    path = write_map(tmp_path_factory.mktemp("maps") / "kv8.json", [(8, 8)] * 4, residual_length=32)
    results = {}
    for name, (args, eager) in LAYOUTS.items():
        server = Server(tiny_llama_dir(64), kvtuner_args(path) + ["--dtype", "float32", *args],
                        logs_dir / f"parallel-{name}.log", env=server_env(**RANKS_ON_CORES), eager=eager)
        try:
            greedy = [server.complete(p, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)["logprobs"]
                      for p in PROMPTS]
            results[name] = {"greedy": greedy, "text": text_logprobs(server), "log": server.log()}
        finally:
            server.stop()
    return results


@pytest.mark.parametrize("name", ["tensor2", "pipeline2"])
def test_same_outputs_as_one_process(outputs, name):
    single, parallel = outputs["single"], outputs[name]
    gaps = [abs(a - b) for a, b in zip(single["text"], parallel["text"], strict=True)]
    print(f"{name}: max |dlogprob| over {len(gaps)} teacher-forced tokens {max(gaps):.2e}")
    assert max(gaps) <= LOGPROB_TOL
    compared = 0
    for one, other in zip(single["greedy"], parallel["greedy"], strict=True):
        compared += _common_prefix(one, other)
    # Every prompt's first two tokens (prefill, then a decode step) at least; a flip that early
    # would need a top-2 gap within rounding of the first tokens of all three prompts.
    assert compared >= 2 * len(PROMPTS)


def _common_prefix(one: dict, other: dict) -> int:
    """Positions of two greedy runs compared: their log-probs agree within LOGPROB_TOL while their
    tokens agree, and where the tokens part, the first run's top-2 gap must be within what two
    such log-probs can swap (2 x LOGPROB_TOL): a near tie, not a wrong head, layer or ring."""
    for i, (mine, theirs) in enumerate(zip(one["top_logprobs"], other["top_logprobs"], strict=True)):
        for token in mine.keys() & theirs.keys():
            assert abs(mine[token] - theirs[token]) <= LOGPROB_TOL, (i, token)
        if one["tokens"][i] != other["tokens"][i]:
            assert margin(mine) < 2 * LOGPROB_TOL, f"tokens part at {i} with a top-2 gap of {margin(mine):.3f}"
            return i + 1
    return len(one["tokens"])


def test_capacity_logged_per_rank(outputs):
    assert "KV capacity per rank (tensor parallel 2: 1 KV head(s) each" in outputs["tensor2"]["log"]
    assert "pipeline parallel 2: this stage caches layers" in outputs["pipeline2"]["log"]
    assert "KV capacity:" in outputs["single"]["log"]
