"""The plugin's patches, routing, per-layer page sizes and the backend impl, without a server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import pytest
import torch

vllm = pytest.importorskip("vllm")

from kvtuner_vllm import format as kvformat  # noqa: E402
from kvtuner_vllm import plugin  # noqa: E402
from kvtuner_vllm.map_resolution import CONFIG_KEY, RESOLVED_KEY, ResolvedMap  # noqa: E402
from kvtuner_vllm.precision_map import LayerPrecision, PrecisionMap  # noqa: E402

BLOCK = 128


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()
    plugin.register()  # idempotent: a second call must not stack wrappers


def test_dtype_is_accepted_everywhere():
    import vllm.v1.attention.selector as selector
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert CacheConfig(cache_dtype="kvtuner").cache_dtype == "kvtuner"
    with pytest.raises(Exception, match="cache_dtype"):
        CacheConfig(cache_dtype="bogus")
    assert "kvtuner" in get_args(selector.CacheDType)
    assert STR_DTYPE_TO_TORCH_DTYPE["kvtuner"] is torch.uint8
    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--kv-cache-dtype", "kvtuner"])
    assert args.kv_cache_dtype == "kvtuner"


def test_wrappers_are_not_stacked():
    from vllm.model_executor.layers.attention import Attention

    wrapped = Attention.get_kv_cache_spec
    assert getattr(wrapped, plugin._WRAPPED) and not getattr(wrapped.__wrapped__, plugin._WRAPPED, False)


def test_version_gate_fails_loudly(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.0 only"):
        plugin.register()


def test_routing_only_for_kvtuner():
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    route = type(current_platform).get_attn_backend_cls
    kvtuner = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="kvtuner", block_size=None)
    assert route(None, kvtuner) == plugin.CPU_BACKEND
    auto = kvtuner._replace(kv_cache_dtype="auto")
    assert route(None, auto) != plugin.CPU_BACKEND
    for refused in ({"use_mla": True}, {"has_sliding_window": True}, {"attn_type": "encoder_decoder"}):
        with pytest.raises(plugin.UnsupportedConfigError, match="does not support"):
            route(None, kvtuner._replace(**refused))


PAIRS = [(4, 2), (8, 8), (16, 16)]


def _vllm_config(pairs, head_size=64):
    layers = [LayerPrecision(key_bits=k, value_bits=v) for k, v in pairs]
    resolved = ResolvedMap(PrecisionMap(num_layers=len(pairs), group_size=64, layers=layers), "test")
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BLOCK),
        additional_config={CONFIG_KEY: {RESOLVED_KEY: resolved.to_config()}},
        model_config=SimpleNamespace(dtype=torch.bfloat16),
    )


def _layer(index, backend_name="KVTUNER", head_size=64, num_kv_heads=3):
    backend = SimpleNamespace(get_name=lambda: backend_name, is_mla=lambda: False)
    return SimpleNamespace(
        layer_name=f"model.layers.{index}.self_attn.attn", attn_type="decoder", kv_cache_dtype="kvtuner",
        sliding_window=None, num_kv_heads=num_kv_heads, head_size=head_size, head_size_v=head_size,
        kv_cache_torch_dtype=torch.uint8, attn_backend=backend, impl=SimpleNamespace(),
    )


def test_each_layer_pays_for_its_own_bits():
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    config = _vllm_config(PAIRS)
    layers = [_layer(i) for i in range(len(PAIRS))]
    specs = {layer.layer_name: Attention.get_kv_cache_spec(layer, config) for layer in layers}
    for layer, (k, v), spec in zip(layers, PAIRS, specs.values(), strict=True):
        fmt = kvformat.LayerFormat(k, v, 64, 64)
        assert layer.impl.fmt == fmt  # stamped for the kernels
        assert spec.dtype is torch.uint8
        assert spec.page_size_bytes == BLOCK * 3 * fmt.bytes_per_token
    k4v2, kv8, kv16 = (spec.page_size_bytes for spec in specs.values())
    assert k4v2 == BLOCK * 3 * 56 and kv8 == BLOCK * 3 * 136 and kv16 == BLOCK * 3 * 256
    # one block table: vLLM groups the layers into one spec whose page is the exact sum
    uniform = UniformTypeKVCacheSpecs.from_specs(specs)
    assert uniform is not None and uniform.page_size_bytes == k4v2 + kv8 + kv16


def test_spec_refuses_a_foreign_backend():
    from vllm.model_executor.layers.attention import Attention

    with pytest.raises(plugin.UnsupportedConfigError, match="got backend CPU_ATTN"):
        Attention.get_kv_cache_spec(_layer(0, backend_name="CPU_ATTN"), _vllm_config(PAIRS))


def test_layer_outside_the_map_is_an_error():
    from vllm.model_executor.layers.attention import Attention

    with pytest.raises(ValueError, match="index 3"):
        Attention.get_kv_cache_spec(_layer(3), _vllm_config(PAIRS))


def test_backend_impl_runs_the_kernels_like_the_reference():
    """do_kv_cache_update then forward, on a prefill and a decode sequence, against format.py."""
    from kvtuner_vllm.backend.common import KVTunerAttentionImpl, KVTunerMetadata
    from kvtuner_vllm.backend.cpu import KVTunerCPUBackend

    assert KVTunerCPUBackend.get_name() == "KVTUNER" and KVTunerCPUBackend.supports_kv_cache_dtype("kvtuner")
    assert not KVTunerCPUBackend.supports_kv_cache_dtype("auto")
    torch.manual_seed(0)
    fmt = kvformat.LayerFormat(4, 2, 64, 64)
    heads, kv_heads, block = 6, 3, 16
    impl = KVTunerAttentionImpl(heads, 64, 0.125, kv_heads, None, None, "kvtuner")
    impl.fmt = fmt
    cache = torch.zeros(8, kv_heads, block, fmt.bytes_per_token, dtype=torch.uint8)
    # seq 0: 20 prompt tokens in blocks [2, 5]; seq 1: decode of its 7th token in block [1]
    slots = torch.cat([torch.cat([torch.arange(2 * block, 3 * block), torch.arange(5 * block, 5 * block + 4)]),
                       torch.tensor([1 * block + 6])])
    for_seq1 = torch.randn(6, kv_heads, 64, dtype=torch.bfloat16)
    kvformat.quantize_and_cache_ref(for_seq1, for_seq1, cache, torch.arange(block, block + 6), fmt)
    q = torch.randn(21, heads, 64, dtype=torch.bfloat16)
    k = torch.randn(21, kv_heads, 64, dtype=torch.bfloat16)
    v = torch.randn(21, kv_heads, 64, dtype=torch.bfloat16)
    meta = KVTunerMetadata(num_actual_tokens=21, max_query_len=20, max_seq_len=20,
                           query_start_loc=torch.tensor([0, 20, 21], dtype=torch.int32),
                           seq_lens=torch.tensor([20, 7], dtype=torch.int32),
                           block_table=torch.tensor([[2, 5], [1, 0]], dtype=torch.int32), slot_mapping=slots)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    expected_cache = cache.clone()
    impl.do_kv_cache_update(layer, k, v, cache, slots)
    kvformat.quantize_and_cache_ref(k, v, expected_cache, slots, fmt)
    assert torch.equal(cache, expected_cache)
    out = torch.empty_like(q)
    impl.forward(layer, q, k, v, cache, meta, out)
    expected = kvformat.paged_attention_ref(q, cache, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                            0.125, fmt)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
