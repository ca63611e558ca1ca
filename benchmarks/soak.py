"""Soak: one `vllm serve --kv-cache-dtype kvtuner` with a small KV cache, driven for a few minutes by
concurrent clients doing what real clients do: greedy and sampled completions of random lengths,
streaming and not, clients that disconnect mid-stream, malformed requests. vLLM must preempt and
recompute under the memory pressure. Then it checks that the server is alive, that the KV cache
returns to empty (no leaked block), and that every completed greedy response equals the same
request served alone (a sample of them, re-run one at a time).

    python -m benchmarks.soak [--minutes 3] [--clients 6]

Writes benchmarks/results/soak.json. The model runs in fp32 with an 8-bit KIVI map with a window,
so a request's tokens can only change by the mechanics (see tests/backend/test_e2e_exactness.py):
they are compared up to the alone run's first top-2 gap under 0.2 nats. Bounded: every loop stops at
the deadline, every request has a timeout, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import pydoc_data.topics
import random
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from benchmarks.common import machine_info, write_json
from benchmarks.server import Server, ServerError
from kvtuner_vllm.precision_map import PrecisionMap

MARGIN = 0.2  # nats: tokens are compared up to the alone run's first smaller top-2 gap
BLOCK = 32
NUM_BLOCKS = 48  # 1.5k tokens of pages: a handful of running requests outgrow it
MAX_MODEL_LEN = 512
TOPICS = sorted(pydoc_data.topics.topics)


def _margin(top: dict[str, float]) -> float:
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else math.inf


class Soak:
    def __init__(self, server: Server, seed: int):
        self.server = server
        self.counts: Counter[str] = Counter()
        self.greedy: list[dict] = []  # completed greedy requests: prompt, max_tokens, tokens, margins
        self.lock = threading.Lock()
        self.rng = random.Random(seed)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def prompt(self, rng: random.Random) -> str:
        text = pydoc_data.topics.topics[rng.choice(TOPICS)]
        start = rng.randrange(max(1, len(text) - 200))
        return text[start : start + rng.randint(40, 1200)]

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.rng.random() + index)
        actions = [self.greedy_request, self.stream_request, self.disconnect, self.sampled_request, self.malformed]
        weights = [4, 2, 1, 1, 1]
        while time.monotonic() < deadline:
            action = rng.choices(actions, weights)[0]
            try:
                action(rng)
            except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:
                self.count("errors")
                print(f"[soak] client {index}: {action.__name__}: {err}", flush=True)

    def greedy_request(self, rng: random.Random) -> None:
        prompt, max_tokens = self.prompt(rng), rng.randint(1, 96)
        choice = self.server.complete(prompt, max_tokens=max_tokens, logprobs=2, ignore_eos=True)
        logprobs = choice["logprobs"]
        record = {"prompt": prompt, "max_tokens": max_tokens, "tokens": logprobs["tokens"],
                  "margins": [_margin(top) for top in logprobs["top_logprobs"]]}
        with self.lock:
            self.greedy.append(record)
        self.count("completed")

    def stream_request(self, rng: random.Random) -> None:
        body = {"model": "model", "prompt": self.prompt(rng), "max_tokens": rng.randint(1, 96), "stream": True,
                "temperature": 0, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=300)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise ValueError(f"stream answered {response.status}")
            done = any(line.strip() == b"data: [DONE]" for line in response)
        finally:
            conn.close()
        self.count("completed" if done else "errors")

    def disconnect(self, rng: random.Random) -> None:
        """Stream a long completion, read a few chunks, then hang up."""
        body = {"model": "model", "prompt": self.prompt(rng), "max_tokens": 200, "stream": True,
                "temperature": 0, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        for _ in range(rng.randint(1, 8)):
            response.fp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.count("aborted")

    def sampled_request(self, rng: random.Random) -> None:
        body = {"model": "model", "prompt": self.prompt(rng), "max_tokens": rng.randint(1, 48), "n": 2,
                "temperature": 0.8, "seed": rng.randint(0, 2**31), "ignore_eos": True}
        self.server.post("/v1/completions", body)
        self.count("completed")

    def malformed(self, rng: random.Random) -> None:
        """A request the server must refuse with a 4xx and survive."""
        bodies = [
            b'{"model": "model", "prompt": ',  # truncated JSON
            json.dumps({"model": "model", "prompt": "x", "max_tokens": -5}).encode(),
            json.dumps({"model": "no-such-model", "prompt": "x"}).encode(),
            json.dumps({"model": "model", "prompt": "x " * 5000, "max_tokens": 8}).encode(),  # over max_model_len
        ]
        request = urllib.request.Request(f"{self.server.url}/v1/completions", rng.choice(bodies),
                                         {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60).close()
            self.count("malformed_accepted")
        except urllib.error.HTTPError as err:
            self.count("malformed_refused" if 400 <= err.code < 500 else "errors")


def verify(server: Server, records: list[dict], limit: int, seed: int) -> dict:
    """Re-run a sample of the completed greedy requests alone; count those whose tokens differ."""
    sample = random.Random(seed).sample(records, min(limit, len(records)))
    mismatches, compared = 0, 0
    for record in sample:
        alone = server.complete(record["prompt"], max_tokens=record["max_tokens"], logprobs=2, ignore_eos=True)
        tokens = alone["logprobs"]["tokens"]
        margins = [_margin(top) for top in alone["logprobs"]["top_logprobs"]]
        horizon = next((i for i, m in enumerate(margins) if m < MARGIN), len(tokens))
        compared += horizon
        mismatches += tokens[:horizon] != record["tokens"][:horizon]
    return {"verified_requests": len(sample), "compared_tokens": compared, "mismatches": mismatches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--verify", type=int, default=30, help="completed greedy requests re-run alone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        from kvtuner_vllm.bundled_models import materialize

        args.model = materialize()
    num_layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    work = Path(tempfile.mkdtemp(prefix="kvtuner-soak-"))
    map_path = work / "map.json"
    PrecisionMap.uniform(num_layers, 8, 8, 64, scheme="kivi", key_group_size=16, residual_length=32).save(map_path)
    serve_args = ["--kv-cache-dtype", "kvtuner", "--additional-config",
                  json.dumps({"kvtuner": {"precision_map": str(map_path)}}), "--dtype", "float32",
                  "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(NUM_BLOCKS),
                  "--max-model-len", str(MAX_MODEL_LEN)]
    started = time.monotonic()
    server = Server(args.model, serve_args, work / "server.log")
    try:
        soak = Soak(server, args.seed)
        deadline = time.monotonic() + 60 * args.minutes
        threads = [threading.Thread(target=soak.client, args=(i, deadline)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        alive = server.proc.poll() is None and server.healthy()
        metrics = server.wait_idle() if alive else {}
        checked = verify(server, soak.greedy, args.verify, args.seed) if alive else {}
    finally:
        server.stop()
    result = {
        "machine": machine_info(), "model": args.model.name, "settings": {**vars(args), "model": args.model.name,
                                                                           "block_size": BLOCK,
                                                                           "num_blocks": NUM_BLOCKS},
        "requests": dict(soak.counts), "preempted": metrics.get("vllm:num_preemptions_total", 0),
        "crashes": 0 if alive else 1, "leaked_kv_usage": metrics.get("vllm:kv_cache_usage_perc"),
        **checked, "wall_seconds": time.monotonic() - started,
    }
    path = write_json("soak", result)
    print(json.dumps(result, indent=2))
    print(f"[soak] wrote {path}; server log {work / 'server.log'}")
    ok = alive and result["leaked_kv_usage"] == 0 and checked.get("mismatches") == 0 and not soak.counts["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ServerError as err:
        raise SystemExit(f"[soak] {err}") from None
