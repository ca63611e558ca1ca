"""Bad input stops the real `vllm serve --kv-cache-dtype kvtuner` at startup, before the model is
loaded and before any KV memory is allocated, with one message that names the problem and the fix,
printed alone and last, and a non-zero exit. A few representative cases (a bad map, an engine
option, a model kind, an environment switch); test_refusals.py checks every case in-process."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from bad_inputs import cases
from conftest import VLLM, free_port, serve_command, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVED = ["malformed", "window_block", "mla", "batch_invariant"]


@pytest.fixture(scope="module")
def outcomes(tiny_llama_dir, tmp_path_factory):
    if not VLLM.exists():
        pytest.fail(f"{VLLM} is missing: run `bash scripts/setup.sh`")
    tmp = tmp_path_factory.mktemp("bad-input")
    chosen = {name: case for name, case in cases(tiny_llama_dir(64), tmp).items() if name in SERVED}

    def serve(case):
        cmd = serve_command(case.model, free_port(), *case.args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=server_env(**case.env),
                              check=False)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(chosen, pool.map(serve, chosen.values()), strict=True))
    yield {name: (results[name], chosen[name].fragments) for name in chosen}
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", SERVED)
def test_bad_input_exits_before_loading_with_the_error_alone(outcomes, case):
    result, fragments = outcomes[case]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    last = output[output.rfind("kvtuner: error: "):]
    assert last.startswith("kvtuner: error: "), output[-3000:]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} missing from:\n{output[-3000:]}"
    # Alone: no traceback and no pydantic dump around it.
    assert "Traceback" not in output and "ValidationError" not in output, output[-3000:]
    assert "Starting to load model" not in output  # refused in the API server, before any engine process
