"""The CPU backend: vLLM's CPU backend class with our declarations, layout, impl and builder.

A 16/16 layer's page has the size of vLLM's own CPU page, so such layers are handed to vLLM's own
CPU cache writer and attention kernels, which lay K and V out inside it their own way (per ISA):
an all-16 map computes exactly what `--kv-cache-dtype auto` does, and unquantized layers of a mixed
map pay nothing extra. vLLM groups layers by spec, and only 16/16 layers have a page of
2·D·itemsize bytes per token, so a builder knows from its spec whether its group is unquantized.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from kvtuner_vllm.backend.common import KVTunerAttentionImpl, KVTunerBackendMixin, KVTunerMetadataBuilder


def unquantized_spec(kv_cache_spec, dtype) -> bool:
    """Whether a group's spec is that of 16/16 layers (pages vLLM's kernels read as they are)."""
    return kv_cache_spec.state_content_bytes == 2 * kv_cache_spec.head_size * dtype.itemsize


class KVTunerCPUMetadataBuilder(KVTunerMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.stock = None
        if unquantized_spec(kv_cache_spec, vllm_config.model_config.dtype):
            # Also picks the ISA and stamps it on the group's layers (layer.isa), as stock does.
            self.stock = CPUAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.stock is not None:
            metadata.stock = self.stock.build(common_prefix_len, common_attn_metadata, fast_build)
        return metadata


class KVTunerCPUAttentionImpl(KVTunerAttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="kvtuner", logits_soft_cap=None, attn_type="decoder",
                 kv_sharing_target_layer_name=None, **extra_impl_args) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra_impl_args)
        self.stock = CPUAttentionBackendImpl(num_heads, head_size, scale, self.num_kv_heads, None, None,
                                             "auto", logits_soft_cap, attn_type)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.fmt.unquantized:
            self.stock.do_kv_cache_update(layer, key, value, kv_cache.view(self.fmt.dtype), slot_mapping)
        else:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is not None and self.fmt.unquantized:
            return self.stock.forward(layer, query, key, value, kv_cache.view(self.fmt.dtype), attn_metadata.stock,
                                      output, output_scale, output_block_scale)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)


class KVTunerCPUBackend(KVTunerBackendMixin, CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVTunerCPUAttentionImpl]:
        return KVTunerCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVTunerCPUMetadataBuilder]:
        return KVTunerCPUMetadataBuilder
