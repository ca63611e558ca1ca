"""Python side of the host emulator: builds harness.cpp (the CUDA ops' torch-free code under
emulator.h, debug checks on) into a shared library and calls it through ctypes, on CPU tensors."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

from kvtuner_vllm import format as kvformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
ELEM_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # packed_format.h ElemType

I64, I32, FLOAT, PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class TensorArg(ctypes.Structure):  # harness.cpp
    _fields_ = [("data", PTR), ("sizes", I64 * 4), ("strides", I64 * 4)]


class BatchArg(ctypes.Structure):  # harness.cpp
    _fields_ = [("query_start_loc", PTR), ("seq_lens", PTR), ("num_seqs", I32), ("ring", ctypes.POINTER(TensorArg)),
                ("ring_block_ids", PTR), ("dtype", I32), ("format", I32 * 5)]


def tensor_arg(t: torch.Tensor) -> TensorArg:
    arg = TensorArg(t.data_ptr())
    arg.sizes[: t.dim()] = list(t.shape)
    arg.strides[: t.dim()] = list(t.stride())
    return arg


def build_requirements() -> str | None:
    """Why the emulator cannot be built here (None: it can)."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if not (cuda_include() / "cuda_fp16.h").exists():
        return f"no CUDA headers under {cuda_include()}"
    return None


def cuda_include() -> Path:
    return Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


def build(directory: Path) -> ctypes.CDLL:
    library = directory / "libemulator.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-DKVTUNER_DEBUG_CHECKS=1",
                    f"-I{cuda_include()}", f"-I{REPO / 'csrc'}", str(HERE / "harness.cpp"), "-o", str(library)],
                   check=True)
    lib = ctypes.CDLL(str(library))
    lib.emu_error.restype = ctypes.c_char_p
    lib.emu_plan_attention.argtypes = [I64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(I64)]
    lib.emu_paged_attention.argtypes = [ctypes.POINTER(TensorArg)] * 6 + [ctypes.POINTER(BatchArg), ctypes.c_int,
                                                                          FLOAT, FLOAT]
    return lib


def plan_attention(lib, num_tokens, num_seqs, num_q_heads, num_kv_heads, head_size, max_query_len) -> dict:
    """The CUDA work split of a batch (csrc/cuda/paged_attention.cu plan_attention)."""
    plan = (I64 * 4)()
    lib.emu_plan_attention(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_size, max_query_len, plan)
    return dict(zip(("decode_tiles_per_seq", "num_partitions", "prefill_tiles", "workspace_bytes"), plan))


class EmulatorOps:
    """The ops as the CUDA launchers run them, on CPU tensors; a failed launch raises with its message."""

    device = "cpu"

    def __init__(self, lib, fmt: kvformat.LayerFormat):
        self.lib, self.fmt = lib, fmt

    def _batch(self, query_start_loc, seq_lens, ring=None, ring_ids=None) -> BatchArg:
        fmt = self.fmt
        self._ring_arg = tensor_arg(ring) if ring is not None else None  # kept alive for the call
        return BatchArg(query_start_loc.data_ptr(), seq_lens.data_ptr(), seq_lens.numel(),
                        ctypes.pointer(self._ring_arg) if ring is not None else None,
                        ring_ids.data_ptr() if ring_ids is not None else None, ELEM_TYPE[fmt.dtype],
                        (I32 * 5)(fmt.key_bits, fmt.value_bits, fmt.group_size, fmt.kernel_key_group_size, fmt.window))

    def _check(self, status: int) -> None:
        if status:
            message = self.lib.emu_error().decode()
            self.lib.emu_clear_error()
            raise RuntimeError(message)

    def quantize_and_cache(self, key, value, cache, slots, query_start_loc, seq_lens, ring=None, ring_ids=None):
        batch = self._batch(query_start_loc, seq_lens, ring, ring_ids)
        self._check(self.lib.emu_quantize_and_cache(
            ctypes.byref(tensor_arg(key)), ctypes.byref(tensor_arg(value)), ctypes.byref(tensor_arg(cache)),
            ctypes.c_void_p(slots.data_ptr()), I64(slots.numel()), ctypes.byref(batch)))

    def paged_attention(self, out, query, key, value, cache, block_table, seq_lens, query_start_loc, max_query_len,
                        scale, ring=None, ring_ids=None, softcap=None):
        batch = self._batch(query_start_loc, seq_lens, ring, ring_ids)
        args = [ctypes.byref(tensor_arg(t)) for t in (out, query, key, value, cache, block_table)]
        self._check(self.lib.emu_paged_attention(*args, ctypes.byref(batch), max_query_len, scale, softcap or 0.0))

    def write_window(self, key, value, ring, ring_ids, query_start_loc, seq_lens):
        batch = self._batch(query_start_loc, seq_lens, ring, ring_ids)
        self._check(self.lib.emu_write_window(ctypes.byref(tensor_arg(key)), ctypes.byref(tensor_arg(value)),
                                              ctypes.byref(batch)))
