"""paged_attention's AMX decode kernel (csrc/cpu/amx/decode_attention.cpp) against reference.paged_attention_ref.

The kernel takes short-query items (decodes, speculative steps) of bfloat16 models whose keys and
values are both packed (per-token groups or kivi keys): Q.codes^T and P'.codes on AMX tiles, the
codes as exact bf16 operands, scales and zeros applied in fp32 around the products (kivi keys'
per-channel scales in the query, as two bf16 parts). Against the fp32 reference it rounds one
thing, each weight p * value scale to bf16 (relative error at most u = 2^-8; 8-bit values keep two
bf16 parts, 2^-16), with the codes centred on their group's midpoint m so that the error of a
key's share is p d (v - m), and window keys' weights p (error p d v); the softmax sum adds the
unrounded p. So outputs are compared by kernel_cases.check_bf16_rows with Roundings(weights=...)
against the fp32 reference of the same bf16 inputs (its docstring derives the bound), and one key,
or one 16-key tile, dropped out of 3000 must fail that comparison (test_dropped_key_or_tile_fails).

Each case runs twice in one process, with the AMX kernel and with the vector kernel
(KVTUNER_DECODE_ISA=off, read at every call): each run asserts the route it took (ops.cpu_routes)
and matches the reference (the vector kernel's rows are fp32 but for the output's rounding).
Skipped where the CPU has no AMX.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import BF16_UNIT, Roundings, bf16_reference, check_bf16_rows, layer_format, make_batch
from test_paged_attention import RAGGED_SEQ_LENS, run_op

from kvtuner_vllm import ops

pytestmark = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="the CPU has no AMX tiles")

# Every packed bit pair the calibration searches over.
PACKED_BIT_PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2), (2, 8)]


def amx_roundings(value_bits: int) -> Roundings:
    """8-bit values' weights enter as two bf16 parts (kSplitWeights): ~16 significant bits."""
    return Roundings(weights=BF16_UNIT if value_bits < 8 else 2.0**-16)


def run_routed(batch, monkeypatch, decode_isa: str) -> tuple[torch.Tensor, ops.CpuRoutes]:
    monkeypatch.setenv("KVTUNER_DECODE_ISA", decode_isa)
    ops.reset_cpu_routes()
    out = run_op(batch, "cpu", padding=2)
    return out, ops.cpu_routes()


def check(batch, monkeypatch, every_item: bool = True) -> None:
    """Both kernels against the reference; the AMX run took every item (`every_item`) or some."""
    scale = batch.fmt.head_size**-0.5
    on_amx, amx_routes = run_routed(batch, monkeypatch, "amx")
    on_vectors, vector_routes = run_routed(batch, monkeypatch, "off")
    if every_item:
        assert amx_routes.taken() == {"amx_decode"}, amx_routes
    else:
        assert "amx_decode" in amx_routes.taken() and amx_routes.taken() <= {"amx_decode", "vector"}, amx_routes
    assert vector_routes.taken() == {"vector"}, vector_routes
    check_bf16_rows(on_amx, bf16_reference(batch, scale, amx_roundings(batch.fmt.value_bits)))
    check_bf16_rows(on_vectors, bf16_reference(batch, scale, Roundings()))


@pytest.mark.parametrize("window", [0, 5, "block"])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("key_bits,value_bits", PACKED_BIT_PAIRS)
def test_decode_ragged_batch(key_bits, value_bits, block_size, window, monkeypatch):
    window = block_size if window == "block" else window
    fmt = layer_format(key_bits, value_bits, 64, 32, window=window)
    batch = make_batch(fmt, RAGGED_SEQ_LENS, [1] * len(RAGGED_SEQ_LENS), num_q_heads=9, num_kv_heads=3,
                       block_size=block_size)
    check(batch, monkeypatch)


# Head sizes with every group count the kernel takes (D / G <= 4), and query rows per KV head up
# to 16 / (D / G) (16 rows and more go to the prefill kernel).
@pytest.mark.parametrize(
    "head_size,group_size,num_q_heads,num_kv_heads",
    [(64, 64, 15, 1), (96, 32, 10, 2), (96, 96, 4, 4), (128, 32, 8, 2), (128, 128, 32, 8), (256, 64, 8, 2),
     (256, 256, 12, 1)],
)
def test_head_and_group_sizes(head_size, group_size, num_q_heads, num_kv_heads, monkeypatch):
    fmt = layer_format(4, 8, head_size, group_size, window=16)
    batch = make_batch(fmt, [1, 40, 129, 300], [1, 1, 1, 1], num_q_heads, num_kv_heads, block_size=32)
    check(batch, monkeypatch)


@pytest.mark.parametrize("window,key_group_size", [(0, 0), (16, 0), (32, 16)])
def test_speculative_rows(window, key_group_size, monkeypatch):
    """Items of several query tokens: each row reads its own packed range and window. Items of more
    (row, key group) columns than a score tile holds (the 9 rows and more here) stay on vectors."""
    fmt = layer_format(4, 4, 64, 32, window=window, key_group_size=key_group_size)
    batch = make_batch(fmt, [70, 129, 33, 250], [3, 4, 2, 5], num_q_heads=6, num_kv_heads=2, block_size=32)
    check(batch, monkeypatch, every_item=False)


# Kivi keys (per-channel scales over key groups of G_t positions): key group sizes, windows of one
# or two groups, every packed bit pair.
@pytest.mark.parametrize("key_bits,value_bits", PACKED_BIT_PAIRS)
@pytest.mark.parametrize("key_group_size,window,block_size", [(16, 16, 16), (32, 64, 64), (64, 64, 128)])
def test_kivi_keys(key_bits, value_bits, key_group_size, window, block_size, monkeypatch):
    fmt = layer_format(key_bits, value_bits, 64, 32, window=window, key_group_size=key_group_size)
    batch = make_batch(fmt, RAGGED_SEQ_LENS, [1] * len(RAGGED_SEQ_LENS), num_q_heads=9, num_kv_heads=3,
                       block_size=block_size)
    check(batch, monkeypatch)


@pytest.mark.parametrize("head_size,group_size,num_q_heads", [(128, 64, 8), (96, 32, 2), (256, 128, 4)])
def test_kivi_head_sizes(head_size, group_size, num_q_heads, monkeypatch):
    fmt = layer_format(4, 2, head_size, group_size, window=32, key_group_size=32)
    batch = make_batch(fmt, [1, 40, 129, 300], [1, 1, 1, 1], num_q_heads, num_kv_heads=2, block_size=64)
    check(batch, monkeypatch)


@pytest.mark.parametrize("key_group_size", [0, 32])
def test_long_context_partitions(key_group_size, monkeypatch):
    """Two long sequences: their keys split into partitions merged afterwards."""
    fmt = layer_format(4, 2, 64, 64, window=32, key_group_size=key_group_size)
    batch = make_batch(fmt, [3000, 2100], [1, 1], num_q_heads=9, num_kv_heads=3, block_size=128)
    check(batch, monkeypatch)


def test_dropped_key_or_tile_fails(monkeypatch):
    """check_bf16_rows passes the kernel's output against its own reference and fails it against
    one without a key, or without a 16-key tile, out of 3000: a kernel that skipped them would fail."""
    fmt = layer_format(4, 4, 64, 32)
    batch = make_batch(fmt, [3000], [1], num_q_heads=9, num_kv_heads=3, block_size=128)
    out, routes = run_routed(batch, monkeypatch, "amx")
    assert routes.taken() == {"amx_decode"}, routes
    ref = bf16_reference(batch, 0.125, amx_roundings(4))
    check_bf16_rows(out, ref)
    for dropped in ([1500], list(range(1024, 1040))):
        with pytest.raises(AssertionError, match="its bound"):
            check_bf16_rows(out, ref, ref.without_keys(dropped))


@pytest.mark.parametrize(
    "fmt",
    [layer_format(16, 4, 64, 32), layer_format(4, 16, 64, 32), layer_format(4, 4, 64, 32, torch.float16)],
    ids=["16-bit keys", "16-bit values", "fp16"],
)
def test_other_formats_stay_on_vectors(fmt, monkeypatch):
    """What the kernel does not take runs on the vector kernel: identical outputs either way."""
    batch = make_batch(fmt, [40, 129], [1, 1], num_q_heads=4, num_kv_heads=2, block_size=32)
    on_amx, amx_routes = run_routed(batch, monkeypatch, "amx")
    on_vectors, vector_routes = run_routed(batch, monkeypatch, "off")
    assert amx_routes.taken() == vector_routes.taken() == {"vector"}
    assert torch.equal(on_amx, on_vectors)


def test_rows_beyond_the_kernel_stay_on_vectors(monkeypatch):
    """More (query row, key group) columns than a score tile holds (5 rows x 4 groups > 16) run on
    the vector kernel."""
    fmt = layer_format(4, 4, 128, 32)
    batch = make_batch(fmt, [40, 129], [1, 1], num_q_heads=10, num_kv_heads=2, block_size=32)
    on_amx, amx_routes = run_routed(batch, monkeypatch, "amx")
    on_vectors, vector_routes = run_routed(batch, monkeypatch, "off")
    assert amx_routes.taken() == vector_routes.taken() == {"vector"}
    assert torch.equal(on_amx, on_vectors)
