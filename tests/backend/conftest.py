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
import os
import pydoc_data.topics
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

VLLM = Path(sys.executable).parent / "vllm"
START_TIMEOUT_S = 420


def _plugin_installed() -> bool:
    return any(e.name == "kvtuner" for e in importlib.metadata.entry_points(group="vllm.general_plugins"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("KVTUNER_PRECISION_MAP", None)
    env.update(overrides)
    return env


def serve_command(model: Path, port: int, *args: str, eager: bool = True) -> list[str]:
    """`vllm serve` on 127.0.0.1; eager (no torch.compile warm-up) unless asked otherwise."""
    return [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            *(["--enforce-eager"] if eager else []), "--served-model-name", "model", *args]


class Server:
    """One `vllm serve` process group, its log file, and small HTTP helpers."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None,
                 eager: bool = True):
        if not VLLM.exists():
            pytest.fail(f"{VLLM} is missing: run `bash scripts/setup.sh`")
        if not _plugin_installed():
            pytest.fail("the kvtuner plugin is not installed (no vllm.general_plugins entry): run scripts/setup.sh")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(serve_command(model, self.port, *args, eager=eager), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env or server_env(), start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def post(self, path: str, body: dict, timeout: float = 300) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def complete(self, prompt: str, max_tokens: int = 16, **extra) -> dict:
        """Greedy /v1/completions; returns the first choice."""
        body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return self.post("/v1/completions", body)["choices"][0]

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus metrics, label-free sums: {name: value}."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:]+)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
            if match:
                values[match[1]] = values.get(match[1], 0.0) + float(match[2])
        return values


def logged_capacity_tokens(log: str) -> int:
    """vLLM's own 'CPU KV cache size: N tokens' line."""
    match = re.search(r"KV cache size: ([0-9,]+) tokens", log)
    assert match, "no 'KV cache size' line in the server log"
    return int(match[1].replace(",", ""))


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

@pytest.fixture(scope="session")
def auto_reference(smollm2_dir, logs_dir):
    """`--kv-cache-dtype auto` greedy outputs, teacher-forced log-probs and log, from one server."""
    server = Server(smollm2_dir, [], logs_dir / "auto.log")
    try:
        return {
            "greedy": {p: greedy(server, p) for p in PROMPTS},
            "logprobs": text_logprobs(server),
            "log": server.log(),
        }
    finally:
        server.stop()
