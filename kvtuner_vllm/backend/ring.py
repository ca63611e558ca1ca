"""The full-precision window's storage: one ring per request and attention layer (format.py).

Each kvtuner layer with a window gets a companion layer, `<layer>.kvtuner_ring`, registered in
vLLM's static forward context like any attention layer. Its KV cache spec is vLLM's own
CircularBufferSpec (block_size = R): one block per running request for its whole life, freed
with the request (finish, abort, preemption), never prefix-cached, allocated from the same pool
as the packed pages and counted in vLLM's capacity and admission. The window semantics never
read a ring across a block boundary, so a prefix-cache hit (always block-aligned) needs nothing
from a ring, and a request that restarts after preemption refills its ring as it recomputes.
The kvtuner layer's impl reads the ring's cache and the ring's metadata (each request's ring
block) from the forward context by the companion's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadata, AttentionMetadataBuilder
from vllm.v1.kv_cache_interface import CircularBufferSpec, KVCacheLayout

from kvtuner_vllm import BACKEND_NAME
from kvtuner_vllm import format as kvformat

RING_SUFFIX = ".kvtuner_ring"


@dataclass
class RingMetadata(AttentionMetadata):
    block_ids: torch.Tensor  # int32 [num_reqs]: each request's ring block


class RingMetadataBuilder(AttentionMetadataBuilder[RingMetadata]):
    """A ring group's block table has one column: the request's ring block. The kernels take it as a
    contiguous vector, copied into a buffer that lives as long as the builder (a stable address for
    CUDA graphs)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_ids = torch.zeros(vllm_config.scheduler_config.max_num_seqs, dtype=torch.int32, device=device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> RingMetadata:
        cam = common_attn_metadata
        block_ids = self.block_ids[: cam.num_reqs]
        block_ids.copy_(cam.block_table_tensor[: cam.num_reqs, 0])
        return RingMetadata(block_ids=block_ids)


class RingBackend(AttentionBackend):
    """The backend vLLM sees for ring layers: a builder, no attention of its own."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        raise TypeError("a kvtuner window ring is read by its attention layer; it has no impl of its own")

    @staticmethod
    def get_builder_cls() -> type[RingMetadataBuilder]:
        return RingMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # The packed backends' layout (common.KVTunerBackendMixin): every backend must agree.
        return (KVCacheLayout.BLHNC,)


class WindowRing(torch.nn.Module, AttentionLayerBase):
    """The ring of one kvtuner attention layer, as a KV cache layer vLLM allocates and frees."""

    def __init__(self, name: str, num_kv_heads: int, head_size: int, fmt: kvformat.LayerFormat) -> None:
        super().__init__()
        self.layer_name = name
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.fmt = fmt
        self.kv_cache = torch.tensor([])  # replaced by vLLM's bind_kv_cache

    def get_attn_backend(self) -> type[RingBackend]:
        return RingBackend

    def get_kv_cache_spec(self, vllm_config) -> CircularBufferSpec:
        # A ring block holds R positions of K and V per KV head in the model dtype: ring plane layout.
        return CircularBufferSpec(block_size=self.fmt.window, num_kv_heads=self.num_kv_heads,
                                  head_size=self.head_size, dtype=self.fmt.dtype)


def register_ring(vllm_config, attention, fmt: kvformat.LayerFormat) -> str:
    """Register `attention`'s ring in the static forward context; returns its name."""
    name = attention.layer_name + RING_SUFFIX
    context = vllm_config.compilation_config.static_forward_context
    if name in context:
        raise ValueError(f"Duplicate layer name: {name}")
    context[name] = WindowRing(name, attention.num_kv_heads, attention.head_size, fmt)
    return name
