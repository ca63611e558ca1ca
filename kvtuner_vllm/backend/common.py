"""What the CPU and CUDA backends share: metadata, its builder, and the impl.

Per the packed format's attention semantics, one path serves every step: `do_kv_cache_update`
quantizes the step's K/V into the layer's packed pages, then `forward` runs paged attention of
every query (decode, prefill, chunked prefill, prefix-cache hits alike) over those pages only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvtuner_vllm import format as kvformat
from kvtuner_vllm.plugin import BACKEND_NAME, DTYPE, UnsupportedConfigError


class KVTunerBackendMixin:
    """What both platforms' backends share; listed before the vLLM backend class it refines."""

    forward_includes_kv_cache_update: bool = False
    supported_kv_cache_dtypes: ClassVar[list[str]] = [DTYPE]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[KVTunerAttentionImpl]:
        return KVTunerAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVTunerMetadataBuilder]:
        return KVTunerMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Any multiple of 16 keeps vLLM from splitting its blocks into smaller kernel blocks.
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(kvformat.SUPPORTED_HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # format.py's planes are per (block, head): block-major, head-major interiors.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # The plugin's spec wrapper already set this layer's packed bytes per token.
        return spec


@dataclass
class KVTunerMetadata(AttentionMetadata):
    num_actual_tokens: int  # tokens excluding padding
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs], this step's tokens included
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    stock: Any = None  # the platform's own metadata, for groups of unquantized (16/16) layers


class KVTunerMetadataBuilder(AttentionMetadataBuilder[KVTunerMetadata]):
    """The kernels take vLLM's common metadata as is: nothing to precompute."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # abstract in the base
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVTunerMetadata:
        cam = common_attn_metadata
        return KVTunerMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
        )


class KVTunerAttentionImpl(AttentionImpl[KVTunerMetadata]):
    """Decoder self-attention over packed pages. `fmt` (the layer's bits) is stamped on by the
    plugin's KV-spec wrapper, which knows the layer name; vLLM builds the impl without it."""

    fmt: kvformat.LayerFormat | None = None

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = DTYPE,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        # Model-specific extras (attention sinks, chunked-attention lookback, ...) change the math.
        unsupported = sorted(name for name, value in extra_impl_args.items() if value is not None)
        if unsupported:
            raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} does not support attention with {unsupported}")
        if alibi_slopes is not None:
            raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} does not support ALiBi attention")
        if kv_sharing_target_layer_name is not None:  # it would read another layer's packed format
            raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} does not support cross-layer KV sharing")
        if attn_type != AttentionType.DECODER:
            raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} does not support {attn_type} attention")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.num_queries_per_kv = self.num_heads // self.num_kv_heads

    def _format(self, layer: AttentionLayer) -> kvformat.LayerFormat:
        if self.fmt is None:
            raise RuntimeError(f"{layer.layer_name}: no kvtuner format stamped; was the plugin registered?")
        return self.fmt

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        from kvtuner_vllm import ops

        ops.quantize_and_cache(key, value, kv_cache, slot_mapping, self._format(layer))

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVTunerMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the kvtuner backend")
        if attn_metadata is None:  # profiling / warm-up run: no cache yet
            return output
        from kvtuner_vllm import ops

        n = attn_metadata.num_actual_tokens
        ops.paged_attention(
            output[:n],
            query[:n],
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            attn_metadata.max_query_len,
            attn_metadata.max_seq_len,
            self.scale,
            self._format(layer),
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
        )
        return output
