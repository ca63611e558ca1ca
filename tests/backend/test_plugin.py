"""The plugin's patches, routing, refusals, per-layer page sizes, rings and the backend impl, without a server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import pytest
import torch

vllm = pytest.importorskip("vllm")

from kvtuner_vllm import format as kvformat  # noqa: E402
from kvtuner_vllm import plugin  # noqa: E402
from kvtuner_vllm import reference as kvref  # noqa: E402
from kvtuner_vllm.backend import common, ring  # noqa: E402
from kvtuner_vllm.backend.cpu import KVTunerCPUAttentionImpl, KVTunerCPUBackend  # noqa: E402
from kvtuner_vllm.errors import KVTunerConfigError, UnsupportedConfigError  # noqa: E402
from kvtuner_vllm.map_resolution import CONFIG_KEY, RESOLVED_KEY, ResolvedMap  # noqa: E402
from kvtuner_vllm.precision_map import LayerPrecision, PrecisionMap, PrecisionMapError  # noqa: E402

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
    import sys

    from vllm.model_executor.layers.attention import Attention

    for wrapped in (Attention.get_kv_cache_spec, Attention.__init__):
        assert getattr(wrapped, plugin._WRAPPED) and not getattr(wrapped.__wrapped__, plugin._WRAPPED, False)
    assert getattr(sys.excepthook, plugin._WRAPPED)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu"])
def test_version_gate_accepts_exactly_the_supported_release(version):
    plugin.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.1", "0.32.1+cpu", "0.33.0", "0.31.9"])
def test_version_gate_refuses_every_other_release(version):
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.0 only.*install vllm==0\.32\.0"):
        plugin.check_vllm_version(version)


def test_backend_registered_for_this_platform():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum["KVTUNER"].get_path() == plugin.CPU_BACKEND == plugin.backend_path()


def _selector(**changes):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    config = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="kvtuner", block_size=None)
    return config._replace(**changes)


def test_routing_only_for_kvtuner():
    from vllm.platforms import current_platform

    route = type(current_platform).get_attn_backend_cls
    assert route(None, _selector()) == plugin.CPU_BACKEND
    assert route(None, _selector(kv_cache_dtype="auto")) != plugin.CPU_BACKEND


@pytest.mark.parametrize("changes,reason", [
    ({"use_mla": True}, "MLA not supported"),
    ({"has_sliding_window": True}, "sliding window not supported"),
    ({"attn_type": "encoder_decoder"}, "attention type encoder_decoder not supported"),
    ({"attn_type": "encoder_only"}, "attention type encoder_only not supported"),
    ({"use_non_causal": True}, "non-causal attention not supported"),
    ({"use_mm_prefix": True}, "partial multimodal token full attention not supported"),
    ({"use_batch_invariant": True}, "batch invariance not supported"),
    ({"has_sink": True}, "attention sinks not supported"),
    ({"head_size": 112}, "head_size not supported"),
    ({"dtype": torch.float64}, "dtype not supported"),
])
def test_vllm_validation_refuses_what_the_kernels_do_not_compute(changes, reason):
    """The routing runs vLLM's own validate_configuration on our backend's declarations."""
    from vllm.platforms import current_platform

    with pytest.raises(UnsupportedConfigError, match=f"cannot serve this model's attention: .*{reason}"):
        type(current_platform).get_attn_backend_cls(None, _selector(**changes))


def test_cpu_backend_declares_exactly_what_it_computes():
    backend = KVTunerCPUBackend
    assert backend.get_name() == "KVTUNER" and backend.get_impl_cls() is KVTunerCPUAttentionImpl
    assert backend.supports_kv_cache_dtype("kvtuner") and not backend.supports_kv_cache_dtype("auto")
    assert not (backend.supports_non_causal() or backend.supports_sliding_window() or backend.supports_mm_prefix()
                or backend.supports_sink() or backend.supports_batch_invariance())
    assert [layout.name for layout in backend.supported_kv_cache_layouts()] == ["BLHNC"]
    assert ring.RingBackend.supported_kv_cache_layouts() == backend.supported_kv_cache_layouts()


PAIRS = [(4, 2), (8, 8), (16, 16)]


def _vllm_config(pairs, **options):
    layers = [LayerPrecision(key_bits=k, value_bits=v) for k, v in pairs]
    resolved = ResolvedMap(PrecisionMap(num_layers=len(pairs), group_size=64, layers=layers, **options), "test")
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BLOCK),
        additional_config={CONFIG_KEY: {RESOLVED_KEY: resolved.to_config()}},
        model_config=SimpleNamespace(dtype=torch.bfloat16),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


def _attention(index, backend_name="KVTUNER", head_size=64, num_kv_heads=3):
    backend = SimpleNamespace(get_name=lambda: backend_name, is_mla=lambda: False)
    impl = common.KVTunerAttentionImpl(3 * num_kv_heads, head_size, head_size**-0.5, num_kv_heads)
    return SimpleNamespace(
        layer_name=f"model.layers.{index}.self_attn.attn", attn_type="decoder", kv_cache_dtype="kvtuner",
        sliding_window=None, num_kv_heads=num_kv_heads, head_size=head_size, head_size_v=head_size,
        kv_cache_torch_dtype=torch.uint8, attn_backend=backend, impl=impl,
    )


def _bind(monkeypatch, config, layer) -> None:
    from kvtuner_vllm import vllm_config

    monkeypatch.setattr("vllm.config.get_current_vllm_config", lambda: config)
    vllm_config.bind_layer(layer)


def test_each_layer_pays_for_its_own_bits(monkeypatch):
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    config = _vllm_config(PAIRS)
    layers = [_attention(i) for i in range(len(PAIRS))]
    for layer in layers:
        _bind(monkeypatch, config, layer)
    specs = {layer.layer_name: Attention.get_kv_cache_spec(layer, config) for layer in layers}
    for layer, (k, v), spec in zip(layers, PAIRS, specs.values(), strict=True):
        fmt = kvformat.LayerFormat(k, v, 64, 64)
        assert layer.impl.fmt == fmt and layer.impl.ring_name is None  # no window: no ring
        assert spec.dtype is torch.uint8
        assert spec.page_size_bytes == BLOCK * 3 * fmt.bytes_per_token
    k4v2, kv8, kv16 = (spec.page_size_bytes for spec in specs.values())
    assert k4v2 == BLOCK * 3 * 56 and kv8 == BLOCK * 3 * 136 and kv16 == BLOCK * 3 * 256
    # one block table: vLLM groups the layers into one spec whose page is the exact sum
    uniform = UniformTypeKVCacheSpecs.from_specs(specs)
    assert uniform is not None and uniform.page_size_bytes == k4v2 + kv8 + kv16
    assert config.compilation_config.static_forward_context == {}


def test_window_layers_get_a_ring_of_their_own(monkeypatch):
    from vllm.v1.kv_cache_interface import CircularBufferSpec

    config = _vllm_config(PAIRS, residual_length=32)
    layers = [_attention(i) for i in range(len(PAIRS))]
    for layer in layers:
        _bind(monkeypatch, config, layer)
    context = config.compilation_config.static_forward_context
    # 16/16 layers read everything in full precision already: no ring
    assert sorted(context) == [f"model.layers.{i}.self_attn.attn{ring.RING_SUFFIX}" for i in (0, 1)]
    assert layers[0].impl.ring_name in context and layers[2].impl.ring_name is None
    spec = context[layers[0].impl.ring_name].get_kv_cache_spec(config)
    assert isinstance(spec, CircularBufferSpec) and not spec.prefix_cacheable
    assert (spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype) == (32, 3, 64, torch.bfloat16)
    assert spec.page_size_bytes == kvformat.LayerFormat(4, 2, 64, 64, residual_length=32).window_bytes * 3


def test_binding_refuses_a_foreign_backend(monkeypatch):
    with pytest.raises(UnsupportedConfigError, match="got backend CPU_ATTN"):
        _bind(monkeypatch, _vllm_config(PAIRS), _attention(0, backend_name="CPU_ATTN"))


def test_layer_outside_the_map_is_an_error(monkeypatch):
    with pytest.raises(PrecisionMapError, match="index 3"):
        _bind(monkeypatch, _vllm_config(PAIRS), _attention(3))


def test_window_longer_than_the_block_is_refused(monkeypatch):
    config = _vllm_config(PAIRS, residual_length=64)
    config.cache_config.block_size = 32
    with pytest.raises(PrecisionMapError, match="residual_length 64 exceeds the block size 32"):
        _bind(monkeypatch, config, _attention(0))


def test_block_size_settled_after_binding_is_checked_with_the_spec(monkeypatch):
    """On CUDA vLLM picks the block size in EngineCore, after the layers are built: the spec checks it."""
    from vllm.model_executor.layers.attention import Attention

    config = _vllm_config(PAIRS, residual_length=32)
    config.cache_config.block_size = None
    layer = _attention(0)
    _bind(monkeypatch, config, layer)
    config.cache_config.block_size = 16
    with pytest.raises(PrecisionMapError, match="layers.0.*residual_length 32 exceeds the block size 16"):
        Attention.get_kv_cache_spec(layer, config)


def test_impl_refuses_what_it_cannot_compute():
    for kwargs, what in [({"alibi_slopes": [1.0]}, "ALiBi"), ({"sliding_window": 64}, "sliding-window"),
                         ({"kv_sharing_target_layer_name": "x"}, "cross-layer KV sharing"),
                         ({"attn_type": "encoder"}, "encoder attention"), ({"sinks": torch.zeros(2)}, "sinks")]:
        with pytest.raises(UnsupportedConfigError, match=what):
            common.KVTunerAttentionImpl(4, 64, 0.125, 2, **kwargs)


def test_configuration_errors_are_found_behind_wrapping_exceptions():
    cause = PrecisionMapError("map.json: layer 2 key_bits")
    try:
        try:
            raise cause
        except PrecisionMapError as err:
            raise RuntimeError("Engine core initialization failed") from err
    except RuntimeError as wrapped:
        assert plugin.config_error(wrapped) is cause
    assert isinstance(cause, KVTunerConfigError) and not isinstance(cause, ValueError)  # pydantic must not wrap it
    assert plugin.config_error(RuntimeError("unrelated")) is None


def test_profiling_run_leaves_a_defined_output():
    impl = common.KVTunerAttentionImpl(4, 64, 0.125, 2)
    impl.bind(kvformat.LayerFormat(4, 4, 64, 64), None)
    output = torch.full((3, 4, 64), float("nan"))
    impl.forward(SimpleNamespace(layer_name="l"), output, output, output, torch.empty(0), None, output)
    assert torch.equal(output, torch.zeros_like(output))


@pytest.mark.parametrize("options", [{}, {"residual_length": 32},
                                     {"scheme": "kivi", "key_group_size": 16, "residual_length": 16}],
                         ids=["v1", "window", "kivi"])
def test_backend_steps_compute_the_format_semantics(monkeypatch, options):
    """Two sequences through do_kv_cache_update + forward, step by step (a prefill in two chunks, one
    starting mid-block, then decodes), with the ring carried by the forward context: every output
    equals reference.simulated_attention over the whole sequence (fp32)."""
    torch.manual_seed(0)
    block, heads, kv_heads, head_size = 32, 4, 2, 64
    fmt = kvformat.LayerFormat(4, 2, head_size, 32, torch.float32, **options)
    impl = common.KVTunerAttentionImpl(heads, head_size, head_size**-0.5, kv_heads)
    ring_name = "model.layers.0.self_attn.attn" + ring.RING_SUFFIX
    impl.bind(fmt, ring_name if fmt.has_window else None)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    lengths, steps = [100, 71], [(45, 30), (40, 41), (1, 0), (1, 0), (13, 0)]  # rows per sequence per step
    q = [torch.randn(n, heads, head_size) for n in lengths]
    k = [torch.randn(n, kv_heads, head_size) + torch.randn(kv_heads, head_size) for n in lengths]
    v = [torch.randn(n, kv_heads, head_size) for n in lengths]
    cache = torch.zeros(fmt.cache_shape(12, kv_heads, block), dtype=torch.uint8)
    block_table = torch.tensor([[3, 7, 1, 9], [2, 11, 5, 0]], dtype=torch.int32)
    rings = torch.zeros(fmt.ring_shape(4, kv_heads) if fmt.has_window else (4, kv_heads, 1, 1), dtype=torch.float32)
    ring_ids = torch.tensor([2, 0], dtype=torch.int32)
    done, outputs = [0, 0], [[], []]
    for rows in steps:
        seqs = [s for s in (0, 1) if rows[s]]
        take = [(s, done[s], done[s] + rows[s]) for s in seqs]
        positions = [torch.arange(a, b) for _, a, b in take]
        meta = common.KVTunerMetadata(
            num_actual_tokens=sum(rows), max_query_len=max(rows), max_seq_len=max(b for _, _, b in take),
            query_start_loc=torch.tensor([0, *torch.tensor([rows[s] for s in seqs]).cumsum(0)], dtype=torch.int32),
            seq_lens=torch.tensor([b for _, _, b in take], dtype=torch.int32), block_table=block_table[seqs],
            slot_mapping=torch.cat([block_table[s, p // block].long() * block + p % block
                                    for (s, _, _), p in zip(take, positions)]))
        context = SimpleNamespace(attn_metadata={layer.layer_name: meta,
                                                 ring_name: ring.RingMetadata(block_ids=ring_ids[seqs])},
                                  no_compile_layers={ring_name: SimpleNamespace(kv_cache=rings)})
        monkeypatch.setattr(common, "get_forward_context", lambda context=context: context)
        qq, kk, vv = (torch.cat([t[s][a:b] for s, a, b in take]) for t in (q, k, v))
        impl.do_kv_cache_update(layer, kk, vv, cache, meta.slot_mapping)
        out = torch.empty_like(qq)
        impl.forward(layer, qq, kk, vv, cache, meta, out)
        for (s, _, b), part in zip(take, out.split([rows[s] for s in seqs])):
            outputs[s].append(part)
            done[s] = b
    for s in range(len(lengths)):
        expected = kvref.simulated_attention(q[s][None].transpose(1, 2), k[s][None].transpose(1, 2),
                                                v[s][None].transpose(1, 2), fmt, block, head_size**-0.5)
        torch.testing.assert_close(torch.cat(outputs[s]), expected[0].transpose(0, 1), atol=2e-5, rtol=2e-5)
