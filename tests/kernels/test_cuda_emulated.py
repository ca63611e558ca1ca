"""The CUDA kernels' logic, checked on the CPU: csrc/cuda's kernels run under a host emulator
(cuda_emulator/: a block is blockDim threads, shuffles and __syncthreads are barriers) and
are compared with the format.py references. This covers thread mapping, the group and row
reductions, masking and the partition merge on machines without a GPU; on a GPU machine
the regular kernel tests run the real kernels (kernel_cases.DEVICES includes "cuda").
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_cases import TOLERANCE, make_batch, reference_attention

from kvtuner_vllm import format as kvformat

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "cuda_emulator"
ELEM_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/kernels/api.h ElemType

I64, INT, FLOAT, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class QuantizeParams(ctypes.Structure):  # cuda/kernels/api.h
    _fields_ = [("key", PTR), ("value", PTR), ("key_stride_token", I64), ("key_stride_head", I64),
                ("value_stride_token", I64), ("value_stride_head", I64), ("cache", PTR),
                ("cache_stride_block", I64), ("cache_stride_head", I64), ("slot_mapping", PTR), ("num_tokens", I64)] + [
                   (name, INT) for name in
                   ("num_kv_heads", "head_size", "block_size", "group_size", "key_bits", "value_bits")]


class AttentionParams(ctypes.Structure):  # cuda/kernels/api.h
    _fields_ = [("out", PTR), ("out_stride_token", I64), ("out_stride_head", I64), ("query", PTR),
                ("query_stride_token", I64), ("query_stride_head", I64), ("cache", PTR),
                ("cache_stride_block", I64), ("cache_stride_head", I64), ("block_table", PTR),
                ("block_table_stride", I64), ("seq_lens", PTR), ("query_start_loc", PTR)] + [
                   (name, INT) for name in ("num_seqs", "num_q_heads", "num_kv_heads", "head_size", "block_size",
                                            "group_size", "key_bits", "value_bits", "sliding_window")] + [
                   ("scale", FLOAT), ("softcap", FLOAT), ("num_row_tiles", I64), ("num_partitions", INT),
                   ("partition_len", INT), ("partial_out", PTR), ("partial_stats", PTR)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    compiler = shutil.which("g++")
    if compiler is None or not (cuda_include / "cuda_fp16.h").exists():
        pytest.skip("needs g++ and the CUDA headers")
    library = tmp_path_factory.mktemp("cuda_emulator") / "libemulator.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", f"-I{cuda_include}",
                    f"-I{REPO / 'csrc'}", str(HERE / "harness.cpp"), "-o", str(library), "-pthread"], check=True)
    lib = ctypes.CDLL(str(library))
    lib.emu_quantize_and_cache.argtypes = [ctypes.POINTER(QuantizeParams), INT]
    lib.emu_paged_attention.argtypes = [ctypes.POINTER(AttentionParams), I64, INT, INT, INT]
    return lib


def emulate_quantize_and_cache(lib, key, value, cache, slots, fmt) -> None:
    p = QuantizeParams(key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1), value.stride(0),
                       value.stride(1), cache.data_ptr(), cache.stride(0), cache.stride(1), slots.data_ptr(),
                       slots.numel(), key.shape[1], key.shape[2], cache.shape[2], fmt.group_size, fmt.key_bits,
                       fmt.value_bits)
    lib.emu_quantize_and_cache(ctypes.byref(p), ELEM_TYPE[key.dtype])


def emulate_attention(lib, out, query, batch, scale, sliding_window, softcap) -> None:
    fmt = batch.fmt
    p = AttentionParams()
    p.out, p.out_stride_token, p.out_stride_head = out.data_ptr(), out.stride(0), out.stride(1)
    p.query, p.query_stride_token, p.query_stride_head = query.data_ptr(), query.stride(0), query.stride(1)
    cache = batch.kv_cache
    p.cache, p.cache_stride_block, p.cache_stride_head = cache.data_ptr(), cache.stride(0), cache.stride(1)
    p.block_table, p.block_table_stride = batch.block_table.data_ptr(), batch.block_table.stride(0)
    p.seq_lens, p.query_start_loc = batch.seq_lens.data_ptr(), batch.query_start_loc.data_ptr()
    p.num_seqs, p.num_q_heads, p.num_kv_heads = batch.seq_lens.numel(), query.shape[1], cache.shape[1]
    p.head_size, p.block_size, p.group_size = fmt.head_size, cache.shape[2], fmt.group_size
    p.key_bits, p.value_bits, p.sliding_window = fmt.key_bits, fmt.value_bits, sliding_window or 0
    p.scale, p.softcap = scale, softcap or 0.0
    lib.emu_paged_attention(ctypes.byref(p), query.shape[0], batch.max_query_len, batch.max_seq_len,
                            ELEM_TYPE[query.dtype])


QUANTIZE_CASES = [(d, g, bits, torch.bfloat16) for d, g in
                  [(64, 64), (64, 32), (128, 32), (128, 128), (256, 64), (80, 80), (96, 32), (96, 96)]
                  for bits in [(2, 4), (8, 16)]] + [
                     (128, 64, (4, 8), torch.float16), (64, 32, (16, 2), torch.float16),
                     (128, 64, (2, 16), torch.float32), (64, 64, (8, 4), torch.float32)]


@pytest.mark.parametrize("head_size,group_size,bits,dtype", QUANTIZE_CASES, ids=str)
def test_quantize_and_cache_bytes(emulator, head_size, group_size, bits, dtype):
    fmt = kvformat.LayerFormat(*bits, head_size, group_size, dtype)
    generator = torch.Generator().manual_seed(head_size + group_size)
    tokens, heads, block_size = 37, 3, 16
    fused = (torch.randn(tokens, 2 * heads * head_size + 8, generator=generator) * 3).to(dtype)
    key = fused[:, : heads * head_size].view(tokens, heads, head_size)  # token stride > H * D
    value = fused[:, heads * head_size : 2 * heads * head_size].view(tokens, heads, head_size)
    key[2, 1, :group_size] = 0.75  # a constant group
    num_blocks = 4
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    slots[[0, 9]] = -1
    expected = torch.randint(0, 256, fmt.cache_shape(num_blocks, heads, block_size), dtype=torch.uint8,
                             generator=generator)
    actual = expected.clone()
    kvformat.quantize_and_cache_ref(key, value, expected, slots, fmt)
    emulate_quantize_and_cache(emulator, key, value, actual, slots, fmt)
    assert torch.equal(expected, actual), f"{(expected != actual).sum()} bytes differ"


# (head, group, bits, dtype, seq_lens, query_lens, Hq, Hkv, block_size, window, softcap, padding tokens)
ATTENTION_CASES = {
    "decode-partitions": (64, 64, (4, 2), torch.bfloat16, [700, 5, 1100], [1, 1, 1], 4, 2, 16, None, None, 0),
    "long-context-mixed": (128, 64, (4, 4), torch.bfloat16, [2048, 1, 97, 54, 1000], [1, 1, 1, 20, 3], 4, 1, 128,
                           None, None, 5),
    "prefill-chunked": (64, 32, (2, 8), torch.bfloat16, [40, 300, 290], [40, 1, 7], 4, 2, 16, None, None, 0),
    "gqa-64": (64, 32, (8, 4), torch.float16, [150, 33, 1], [1, 12, 1], 64, 1, 32, None, None, 0),
    "gqa-5": (64, 32, (4, 4), torch.bfloat16, [150, 33, 1], [1, 12, 1], 40, 8, 32, None, None, 0),
    "head-80": (80, 80, (4, 16), torch.float16, [20, 270], [20, 3], 6, 2, 16, None, None, 0),
    "head-96-fp32": (96, 32, (16, 2), torch.float32, [261, 600], [5, 1], 3, 3, 16, None, None, 0),
    "head-256": (256, 128, (8, 8), torch.float32, [70, 200, 9], [1, 30, 9], 4, 2, 128, None, None, 0),
    "window-softcap": (64, 64, (4, 4), torch.bfloat16, [900, 300], [1, 30], 4, 2, 16, 100, 30.0, 0),
    "window-1": (128, 64, (8, 2), torch.float32, [300, 64, 1000, 5], [1, 64, 50, 2], 4, 2, 16, 1, None, 0),
    "empty-sequence": (64, 64, (2, 2), torch.float16, [1300, 40, 600], [1, 0, 2], 4, 2, 16, None, None, 3),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_paged_attention(emulator, case):
    (head_size, group_size, bits, dtype, seq_lens, query_lens, num_q_heads, num_kv_heads, block_size,
     sliding_window, softcap, padding) = ATTENTION_CASES[case]
    fmt = kvformat.LayerFormat(*bits, head_size, group_size, dtype)
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads, num_kv_heads, block_size)
    scale = head_size**-0.5
    expected = reference_attention(batch, scale, sliding_window, softcap)
    # vLLM pads the token dimension past the last sequence; those rows must not matter.
    query = torch.cat([batch.query, torch.randn(padding, num_q_heads, head_size).to(dtype)])
    out = torch.full_like(query, float("nan"))
    emulate_attention(emulator, out, query, batch, scale, sliding_window, softcap)
    torch.testing.assert_close(out[: batch.query.shape[0]].float(), expected.float(), **TOLERANCE[dtype])
