"""Which CPU kernel paged_attention runs: the environment variables that steer it, one rule for all
(csrc/cpu/common/dispatch_env.h: unset or empty is the default, anything but an accepted value is a
ValueError naming the variable, the value and the accepted values, raised by the call whatever its
batch), and the route counters that report it (ops.cpu_routes). KVTUNER_DECODE_ISA,
KVTUNER_PREFILL_ISA and KVTUNER_PREFILL_MIN_ROWS are read at every call; KVTUNER_CPU_ISA once per
process, so its test runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import layer_format, make_batch
from test_paged_attention import run_op

from kvtuner_vllm import ops

# A bf16 batch with a decode and a prompt: either may take another route, so every variable matters.
BF16_BATCH = make_batch(layer_format(4, 4, 64, 32), [300, 64], [1, 64], num_q_heads=4, num_kv_heads=2, block_size=16)
# An fp32 batch: no route but the vector kernel's, so no variable changes what it runs.
FP32_BATCH = make_batch(layer_format(4, 4, 64, 32, torch.float32), [30], [1], num_q_heads=2, num_kv_heads=1,
                        block_size=16)

BAD_VALUES = {
    "KVTUNER_DECODE_ISA": (["AMX", "amx ", "avx512", "on"], "one of amx, off"),
    "KVTUNER_PREFILL_ISA": (["amx2", "AVX512_BF16", "none", "avx512"], "one of amx, avx512_bf16, off"),
    "KVTUNER_PREFILL_MIN_ROWS": (["abc", "0", "-4", "1.5", "16x", "+8", " 8", "99999999999"], "a positive integer"),
}


@pytest.mark.parametrize("variable", list(BAD_VALUES))
def test_bad_values_raise(variable, monkeypatch):
    values, accepted = BAD_VALUES[variable]
    for value in values:
        monkeypatch.setenv(variable, value)
        for batch in (BF16_BATCH, FP32_BATCH):
            with pytest.raises(ValueError) as error:
                run_op(batch, "cpu")
            assert str(error.value).startswith(f"{variable} must be {accepted} (or unset), got '{value}'")
    monkeypatch.delenv(variable)
    run_op(BF16_BATCH, "cpu")  # nothing stays behind


@pytest.mark.parametrize("variable", list(BAD_VALUES))
def test_empty_is_unset(variable, monkeypatch):
    monkeypatch.delenv(variable, raising=False)
    ops.reset_cpu_routes()
    unset = run_op(BF16_BATCH, "cpu"), ops.cpu_routes()
    monkeypatch.setenv(variable, "")
    ops.reset_cpu_routes()
    empty = run_op(BF16_BATCH, "cpu"), ops.cpu_routes()
    assert torch.equal(unset[0], empty[0]) and unset[1] == empty[1]


def test_prefill_variables_route(monkeypatch):
    """KVTUNER_PREFILL_ISA=off keeps the prompt on the vector kernel; KVTUNER_PREFILL_MIN_ROWS sets
    the threshold in query rows per KV head (the decode has 2, the prompt 128)."""
    ops.reset_cpu_routes()
    run_op(BF16_BATCH, "cpu")
    routes = ops.cpu_routes()
    if routes.matrix_unit == "none":
        pytest.skip("the CPU has no matrix unit for the prefill route")
    prefill = f"prefill_{routes.matrix_unit}"
    assert routes.items[prefill] > 0 and routes.sequences[prefill] == 1
    for variable, value, routed in [("KVTUNER_PREFILL_ISA", "off", 0), ("KVTUNER_PREFILL_MIN_ROWS", "129", 0),
                                    ("KVTUNER_PREFILL_MIN_ROWS", "2", 2), ("KVTUNER_PREFILL_MIN_ROWS", "3", 1)]:
        monkeypatch.setenv(variable, value)
        ops.reset_cpu_routes()
        run_op(BF16_BATCH, "cpu")
        assert ops.cpu_routes().sequences[prefill] == routed, (variable, value)
        monkeypatch.delenv(variable)


def test_route_counts_accumulate_until_reset():
    ops.reset_cpu_routes()
    assert not ops.cpu_routes().taken()
    run_op(FP32_BATCH, "cpu")
    once = ops.cpu_routes()
    run_op(FP32_BATCH, "cpu")
    twice = ops.cpu_routes()
    assert once.taken() == {"vector"} and once.sequences["vector"] == 1
    assert twice.items["vector"] == 2 * once.items["vector"] and twice.sequences["vector"] == 2
    ops.reset_cpu_routes()
    assert not ops.cpu_routes().taken()


def test_reported_isa_and_unit():
    """The matrix unit as torch sees the CPU; a CPU with one runs the AVX-512 vector kernel (unless
    KVTUNER_CPU_ISA narrows it, as test_paged_attention's narrower-ISA subprocesses do)."""
    routes = ops.cpu_routes()
    expected_unit = ("amx" if torch.cpu._is_amx_tile_supported() else
                     "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "none")
    assert routes.matrix_unit == expected_unit
    expected_isa = os.environ.get("KVTUNER_CPU_ISA") or ("avx512" if expected_unit != "none" else routes.vector_isa)
    assert routes.vector_isa == expected_isa in ("avx512", "avx2", "baseline")


def test_cpu_isa_once_per_process():
    """A bad KVTUNER_CPU_ISA raises on the call that would choose the build; a later call with a good
    value chooses it, and the process keeps it."""
    code = """
import os, sys
sys.path.insert(0, os.getcwd())
from kernel_cases import layer_format, make_batch
from test_paged_attention import run_op
from kvtuner_vllm import ops
batch = make_batch(layer_format(4, 4, 64, 32), [5], [1], 2, 1, 16)
try:
    run_op(batch, "cpu")
    print("no error")
except ValueError as error:
    print("error:", error)
os.environ["KVTUNER_CPU_ISA"] = "avx2"
run_op(batch, "cpu")
os.environ["KVTUNER_CPU_ISA"] = "baseline"
run_op(batch, "cpu")
print("ran:", ops.cpu_routes().vector_isa, sorted(ops.cpu_routes().taken()))
"""
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVTUNER_CPU_ISA": "avx9000"},
                            cwd=os.path.dirname(__file__), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "error: KVTUNER_CPU_ISA must be one of avx512, avx2, baseline (or unset), got 'avx9000'" in lines
    assert "ran: avx2 ['vector']" in lines
