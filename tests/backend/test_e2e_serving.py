"""End to end on one KV4 server with a full-precision window (SmolLM2-135M-Instruct, real `vllm serve`):
KV capacity against `auto` in the same memory, window rings included; clients that go away
mid-request; prefix-cache hits and parallel sampling. (Preemption and chunking: test_e2e_exactness.)"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CLEAR_MARGIN, TEXT, Server, kvtuner_args, logged_capacity_tokens, margin, write_map

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_LAYERS = 30
BLOCK = 128
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def kv4_server(smollm2_dir, logs_dir, tmp_path_factory):
    path = write_map(tmp_path_factory.mktemp("maps") / "kv4.json", [(4, 4)] * NUM_LAYERS, residual_length=32)
    server = Server(smollm2_dir, kvtuner_args(path) + ["--max-model-len", str(MAX_MODEL_LEN)],
                    logs_dir / "kvtuner-kv4.log")
    yield server
    server.stop()


def test_kv4_capacity_with_its_window_at_least_3_2x_auto(kv4_server, auto_reference):
    """vLLM's own capacity lines, same KV memory: its count (max concurrency x max_model_len) charges
    each request its ring blocks; auto has none, so its count is its token count at any length."""
    kvtuner_tokens = logged_capacity_tokens(kv4_server.log())
    auto_tokens = logged_capacity_tokens(auto_reference["log"])
    ratio = kvtuner_tokens / auto_tokens
    print(f"KV capacity in 1 GiB: auto {auto_tokens:,} tokens, kvtuner KV4 + window {kvtuner_tokens:,} ({ratio:.2f}x)")
    assert ratio >= 3.2
    log = kv4_server.log()
    assert "KV4:  30 layers 0-29" in log
    match = re.search(r"allocated as (\d+) ring block\(s\)", log)
    assert match and int(match[1]) >= 1, "no ring allocation in the startup log"


def _run(server: Server, prompt: str, max_tokens: int) -> dict:
    choice = server.complete(prompt, max_tokens=max_tokens, logprobs=2, ignore_eos=True)
    logprobs = choice["logprobs"]
    margins = [margin(top) for top in logprobs["top_logprobs"]]
    return {"tokens": logprobs["tokens"], "margins": margins}


def _stream_then_disconnect(server: Server, chunks: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"model": "model", "prompt": "Count slowly from one to one thousand:", "max_tokens": 150,
            "ignore_eos": True, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(chunks):
        response.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _time_out(server: Server) -> None:
    with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
        server.post("/v1/completions", {"model": "model", "prompt": "Tell me a long story.", "max_tokens": 150,
                                        "ignore_eos": True}, timeout=3)


def test_disconnects_and_aborts_free_every_block(kv4_server):
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(_stream_then_disconnect, kv4_server, n) for n in (2, 4, 8)]
        jobs.append(pool.submit(_time_out, kv4_server))
        for job in jobs:
            job.result()
    # The server keeps serving while the aborted requests are torn down.
    assert "Paris" in kv4_server.complete("The capital of France is", max_tokens=8)["text"]
    deadline = time.monotonic() + 120
    while True:
        metrics = kv4_server.metrics()
        idle = metrics.get("vllm:num_requests_running", 1) == 0 and metrics.get("vllm:num_requests_waiting", 1) == 0
        if idle and metrics.get("vllm:kv_cache_usage_perc", 1) == 0:
            break
        assert time.monotonic() < deadline, f"KV blocks not returned: {metrics.get('vllm:kv_cache_usage_perc')}"
        time.sleep(1)


def test_prefix_cache_hit_and_parallel_sampling(kv4_server):
    """A repeated prompt reuses its packed blocks (prefix cache) and continues as the first did;
    n > 1 forks one packed prefix into several sequences."""
    prompt = "Here is a passage from the Python documentation. " + TEXT  # ~400 tokens: 3 full blocks
    before = kv4_server.metrics().get("vllm:prefix_cache_hits_total", 0)
    first = _run(kv4_server, prompt, max_tokens=16)
    second = _run(kv4_server, prompt, max_tokens=16)
    assert kv4_server.metrics().get("vllm:prefix_cache_hits_total", 0) - before >= BLOCK
    horizon = next((i for i, m in enumerate(first["margins"]) if m < CLEAR_MARGIN), 16)
    assert second["tokens"][:horizon] == first["tokens"][:horizon]
    body = {"model": "model", "prompt": "Once upon a time", "max_tokens": 8, "n": 3, "temperature": 0.8,
            "seed": 0, "ignore_eos": True}
    choices = kv4_server.post("/v1/completions", body)["choices"]
    assert len(choices) == 3 and all(c["finish_reason"] == "length" and c["text"] for c in choices)
