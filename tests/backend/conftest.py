"""A real `vllm serve` per configuration for the end-to-end tests, on 127.0.0.1.

Servers start with --enforce-eager (no inductor warm-up), both cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0),
HF_HUB_OFFLINE=1 and a 1 GiB KV space unless a test asks otherwise; each runs in its own process
group, killed as a group on teardown. Only one server runs at a time: fixtures that start one are
module-scoped (or session-scoped, for the `auto` reference) and stop it before the next starts.
"""

from __future__ import annotations

import importlib.metadata
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

import pytest

VLLM = Path(sys.executable).parent / "vllm"
START_TIMEOUT_S = 420
BLOCK_SIZE = 128  # vLLM CPU's default


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


def serve_command(model: Path, port: int, *args: str) -> list[str]:
    return [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--served-model-name", "model", *args]


class Server:
    """One `vllm serve` process group, its log file, and small HTTP helpers."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None):
        if not VLLM.exists():
            pytest.fail(f"{VLLM} is missing: run `bash scripts/setup.sh`")
        if not _plugin_installed():
            pytest.fail("the kvtuner vLLM plugin is not installed (no vllm.general_plugins entry): run scripts/setup.sh")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(serve_command(model, self.port, *args), stdout=self._log,
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


def write_map(path: Path, pairs: list[tuple[int, int]], group_size: int = 64, model: str | None = None) -> Path:
    data = {"format": "kvtuner-precision-map/v1", "num_layers": len(pairs), "group_size": group_size,
            "layers": [{"key_bits": k, "value_bits": v} for k, v in pairs]}
    if model:
        data["model"] = model
    path.write_text(json.dumps(data))
    return path


def kvtuner_args(map_path: Path) -> list[str]:
    return ["--kv-cache-dtype", "kvtuner", "--additional-config",
            json.dumps({"kvtuner": {"precision_map": str(map_path)}})]
