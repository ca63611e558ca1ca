"""paged_attention's AMX decode kernel (csrc/cpu/attention_amx.cpp) against format.paged_attention_ref.

The kernel takes short-query items (decodes, speculative steps) of bfloat16 models whose keys and
values are both packed (per-token groups or kivi keys): Q.codes^T and P'.codes on AMX tiles, the
codes as exact bf16 operands, scales and zeros applied in fp32 around the products (kivi keys'
per-channel scales in the query, as two bf16 parts). Against the fp32
reference it rounds one thing, each weight p * value scale to bf16 (2^-9 relative), with the codes
centred on their midpoint so that the rounding scales with a value's distance from its group's
middle, as the prefill kernel's rounding of p does. The tests use the kernel tests' bf16
tolerance unchanged (kernel_cases.TOLERANCE).

Each case runs twice in one process, with the AMX kernel and with the vector kernel
(KVTUNER_DECODE_ISA=off, read at every call): both must match the reference, and their outputs
must differ in some bit, which shows that the AMX kernel, not the vector one, computed the first.
Skipped where the CPU has no AMX.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TOLERANCE, layer_format, make_batch, reference_attention
from test_paged_attention import RAGGED_SEQ_LENS, run_op

pytestmark = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="the CPU has no AMX tiles")

# Every packed bit pair the calibration searches over.
PACKED_BIT_PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2), (2, 8)]


def run_both(batch, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("KVTUNER_DECODE_ISA", "amx")
    on_amx = run_op(batch, "cpu", padding=2)
    monkeypatch.setenv("KVTUNER_DECODE_ISA", "off")
    on_vectors = run_op(batch, "cpu", padding=2)
    return on_amx, on_vectors


def check(batch, monkeypatch, expect_amx: bool = True) -> None:
    expected = reference_attention(batch, batch.fmt.head_size**-0.5).float()
    on_amx, on_vectors = run_both(batch, monkeypatch)
    torch.testing.assert_close(on_amx.float(), expected, **TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(on_vectors.float(), expected, **TOLERANCE[torch.bfloat16])
    assert torch.equal(on_amx, on_vectors) != expect_amx, "the AMX kernel did not take (or took) the items"


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
    """Items of several query tokens: each row reads its own packed range and window."""
    fmt = layer_format(4, 4, 64, 32, window=window, key_group_size=key_group_size)
    batch = make_batch(fmt, [70, 129, 33, 250], [3, 4, 2, 5], num_q_heads=6, num_kv_heads=2, block_size=32)
    check(batch, monkeypatch)


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


@pytest.mark.parametrize(
    "fmt",
    [layer_format(16, 4, 64, 32), layer_format(4, 16, 64, 32), layer_format(4, 4, 64, 32, torch.float16)],
    ids=["16-bit keys", "16-bit values", "fp16"],
)
def test_other_formats_stay_on_vectors(fmt, monkeypatch):
    """What the kernel does not take runs on the vector kernel: identical outputs either way."""
    batch = make_batch(fmt, [40, 129], [1, 1], num_q_heads=4, num_kv_heads=2, block_size=32)
    on_amx, on_vectors = run_both(batch, monkeypatch)
    assert torch.equal(on_amx, on_vectors)


def test_rows_beyond_the_kernel_stay_on_vectors(monkeypatch):
    """More (query row, key group) columns than a score tile holds (5 rows x 4 groups > 16) run on
    the vector kernel."""
    fmt = layer_format(4, 4, 128, 32)
    batch = make_batch(fmt, [40, 129], [1, 1], num_q_heads=10, num_kv_heads=2, block_size=32)
    on_amx, on_vectors = run_both(batch, monkeypatch)
    assert torch.equal(on_amx, on_vectors)


def test_rejects_unknown_decode_isa(monkeypatch):
    fmt = layer_format(4, 4, 64, 64)
    batch = make_batch(fmt, [5], [1], num_q_heads=2, num_kv_heads=1, block_size=16)
    monkeypatch.setenv("KVTUNER_DECODE_ISA", "amx2")
    with pytest.raises(ValueError, match="KVTUNER_DECODE_ISA must be amx or off"):
        run_op(batch, "cpu")
