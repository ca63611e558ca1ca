"""One real `vllm serve` on 127.0.0.1, in its own process group, with the small HTTP helpers the
benchmarks and the end-to-end tests share (tests/backend/conftest.py wraps it for pytest)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM = Path(sys.executable).parent / "vllm"


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**overrides: str) -> dict[str, str]:
    """Offline, no usage stats, both cores for vLLM's CPU worker, 1 GiB of KV unless overridden."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("KVTUNER_PRECISION_MAP", None)
    env.update(overrides)
    return {name: value for name, value in env.items() if value != ""}  # "" removes a variable


def serve_command(model: Path, port: int, *args: str, eager: bool = True) -> list[str]:
    """`vllm serve` on 127.0.0.1; eager (no torch.compile warm-up) unless asked otherwise."""
    return [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            *(["--enforce-eager"] if eager else []), "--served-model-name", "model", *args]


class Server:
    """A `vllm serve` process group, its log file, and small HTTP helpers."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None,
                 eager: bool = True, timeout_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(serve_command(model, self.port, *args, eager=eager), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env or server_env(), start_new_session=True)
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1)
        self.stop()
        raise ServerError(f"vllm serve not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
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

    def wait_idle(self, timeout_s: float = 120) -> dict[str, float]:
        """Metrics once nothing runs or waits and the KV cache is empty (or the timeout passes)."""
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = self.metrics()
            busy = metrics.get("vllm:num_requests_running", 1) or metrics.get("vllm:num_requests_waiting", 1)
            if (not busy and metrics.get("vllm:kv_cache_usage_perc", 1) == 0) or time.monotonic() > deadline:
                return metrics
            time.sleep(1)


def capacity_tokens(log: str) -> int | None:
    """vLLM's own 'KV cache size: N tokens' line."""
    match = re.search(r"KV cache size: ([0-9,]+) tokens", log)
    return int(match[1].replace(",", "")) if match else None
