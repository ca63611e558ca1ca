"""16/16 layers on CPU are vLLM's own: their page is what vLLM's CPU cache writer makes of it (at the ISA
vLLM picks, which lays K and V out its own way inside the page) and vLLM's CPU kernels read it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm import _custom_ops as vllm_ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from kvtuner_vllm import format as kvformat  # noqa: E402
from kvtuner_vllm.backend.cpu import KVTunerCPUAttentionImpl  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE, BLOCK, BLOCKS = 6, 3, 64, 128, 5


@pytest.fixture
def vllm_context(tiny_llama_dir):
    """The current VllmConfig vLLM's CPU impl reads at construction (a tiny model's)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(model_config=ModelConfig(model=str(tiny_llama_dir(64)), dtype="bfloat16"))
    with set_current_vllm_config(config):
        yield config


def _request_amx() -> None:
    # vLLM's CPU worker asks the kernel for AMX tile permission before choosing the amx ISA.
    if hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_page_is_what_vllms_cpu_writer_makes(vllm_context, dtype):
    _request_amx()
    torch.manual_seed(0)
    fmt = kvformat.LayerFormat(16, 16, HEAD_SIZE, 64, dtype)
    isa = _get_attn_isa(dtype, BLOCK, HEAD_SIZE)
    impl = KVTunerCPUAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, KV_HEADS)
    impl.bind(fmt, None)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0, layer_name="model.layers.0.attn")
    key, value = (torch.randn(300, KV_HEADS, HEAD_SIZE).to(dtype) for _ in range(2))
    slots = torch.randperm(BLOCKS * BLOCK)[:300]
    # Block-outermost (BLHNC) storage: this layer's pages are strided views into bigger blocks.
    storage = torch.zeros(BLOCKS, 3, KV_HEADS * BLOCK * fmt.bytes_per_token, dtype=torch.uint8)
    ours = storage[:, 1].view(BLOCKS, KV_HEADS, BLOCK, fmt.bytes_per_token)
    impl.do_kv_cache_update(layer, key, value, ours, slots)

    theirs = torch.zeros(BLOCKS, KV_HEADS, 2 * BLOCK, HEAD_SIZE, dtype=dtype)
    key_cache, value_cache = theirs.chunk(2, dim=2)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    assert torch.equal(ours.contiguous().view(dtype).view(theirs.shape), theirs)
    assert storage[:, [0, 2]].count_nonzero() == 0  # nothing written outside the layer's pages


def test_forward_runs_vllms_cpu_attention(vllm_context, monkeypatch):
    impl = KVTunerCPUAttentionImpl(HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, KV_HEADS)
    impl.bind(kvformat.LayerFormat(16, 16, HEAD_SIZE, 64, torch.bfloat16), None)
    calls = []
    monkeypatch.setattr(impl.stock, "forward", lambda *args: calls.append(args) or args[6])
    monkeypatch.setattr("kvtuner_vllm.ops.paged_attention", lambda *args, **kwargs: pytest.fail("packed kernel ran"))
    page = torch.zeros(BLOCKS, KV_HEADS, BLOCK, 4 * HEAD_SIZE, dtype=torch.uint8)
    stock_metadata = object()
    metadata = SimpleNamespace(stock=stock_metadata)
    query = torch.zeros(2, HEADS, HEAD_SIZE, dtype=torch.bfloat16)
    output = torch.empty_like(query)
    assert impl.forward(SimpleNamespace(), query, query, query, page, metadata, output) is output
    (layer, q, k, v, cache, md, out, *_), = calls
    assert md is stock_metadata and cache.dtype == torch.bfloat16 and cache.data_ptr() == page.data_ptr()
