"""README command 1's second half, end to end: scripts/serve.sh starts the real `vllm serve` on the
bundled SmolLM2, and the curl it prints gets a chat answer."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.e2e
def test_serve_script_answers_its_printed_curl(smollm2_dir, tmp_path):
    """The committed default, --kv-cache-dtype kvtuner, as README command 1 runs it (plus --enforce-eager
    to skip the torch.compile warm-up)."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "KV_CACHE_DTYPE"}
    env["PORT"] = str(port)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "serve.sh"), "--enforce-eager", "--max-model-len", "1024"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            assert server.poll() is None, f"server exited {server.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, (
                f"not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
            )
            time.sleep(2)
        text = log_path.read_text()
        assert f"http://127.0.0.1:{port}/v1" in text
        assert "KV cache dtype: kvtuner" in text
        assert "'kv_cache_dtype': 'kvtuner'" in text  # vLLM's own log of its non-default args
        assert "precision map: bundled preset SmolLM2-135M-Instruct.json" in text
        assert "calibrated for this model: KL 0.0038 nats/token" in text  # the preset's own report
        curl = next(line for line in text.splitlines() if line.startswith("curl "))
        assert f"127.0.0.1:{port}/v1/chat/completions" in curl
        argv = shlex.split(curl)
        assert argv[0] == "curl" and "-d" in argv
        answer = subprocess.run([*argv, "--max-time", "120"], capture_output=True, text=True, timeout=150)
        assert answer.returncode == 0, answer.stderr
        body = json.loads(answer.stdout)
        assert body["model"] == "SmolLM2-135M-Instruct", body
        content = body["choices"][0]["message"]["content"]
        assert re.search(r"\w", content), body
        print(f"answer: {content!r}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def test_serve_script_names_the_bundled_models_for_an_unknown_one():
    env = {**os.environ, "MODEL": "llama-3"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh")], capture_output=True, text=True, env=env,
                          timeout=30)
    assert done.returncode == 2
    assert "MODEL=llama-3 is not a bundled model; use smollm2 or qwen2.5-coder-1.5b" in done.stderr
