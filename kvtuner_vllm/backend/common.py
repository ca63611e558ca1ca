"""What the CPU and CUDA backends share: what they support, metadata, its builder, and the impl.

One path serves every step of a layer (format.py, "Attention semantics"):
`do_kv_cache_update` writes the step's K/V into the layer's packed pages, `forward` runs paged
attention of every query (decode, prefill, chunked prefill, prefix-cache hits alike) over the
packed pages, the layer's window ring and the step's own K/V, then appends the step's newest
positions to the ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.forward_context import get_forward_context
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

from kvtuner_vllm import BACKEND_NAME, DTYPE, ops
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.errors import UnsupportedConfigError

PREFERRED_BLOCK_SIZE = 128


class KVTunerBackendMixin:
    """What both platforms' backends declare; listed before the vLLM backend class it refines, so
    vLLM's validate_configuration (run by the plugin's routing) refuses everything else."""

    forward_includes_kv_cache_update: bool = False
    supported_kv_cache_dtypes: ClassVar[list[str]] = [DTYPE]
    supported_dtypes: ClassVar[list[torch.dtype]] = list(kvformat.SUPPORTED_DTYPES)

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
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # The window lies inside a block (format.py): vLLM CUDA's default of 16 positions would cut
        # it short at every block start; 128 is also vLLM CPU's default.
        return max(default_block_size, PREFERRED_BLOCK_SIZE)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(kvformat.SUPPORTED_HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost, each (block, head) plane contiguous (format.py's planes): vLLM then packs
        # layers with different page sizes, and the window rings, into one block without padding.
        return (KVCacheLayout.BLHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    # The kernels compute causal decoder self-attention over full (non-windowed) contexts only.
    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_pcp(cls) -> bool:
        return False

    @classmethod
    def supports_dcp(cls) -> bool:
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
    workspace: torch.Tensor | None = None  # the kernels' split-key scratch (CUDA: vLLM's workspace manager)


class KVTunerMetadataBuilder(AttentionMetadataBuilder[KVTunerMetadata]):
    """The kernels take vLLM's common metadata as is: nothing to precompute."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # abstract in the base
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVTunerMetadata:
        cam = common_attn_metadata
        if cam.causal is not True:  # refused at startup (supports_non_causal); never compute it wrong
            raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} computes causal attention only")
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
    """Decoder self-attention over packed pages. The layer's format (and its ring's name) is bound by
    the plugin when the Attention layer is built (vllm_config.bind_layer): vLLM builds the impl
    without the layer's name, which the map is indexed by."""

    fmt: kvformat.LayerFormat
    ring_name: str | None = None

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
        refused = [
            (bool(unsupported), f"attention with {unsupported}"),
            (alibi_slopes is not None, "ALiBi attention"),
            (sliding_window is not None, "sliding-window attention"),
            (kv_sharing_target_layer_name is not None, "cross-layer KV sharing"),  # another layer's format
            (attn_type != AttentionType.DECODER, f"{attn_type} attention"),
        ]
        for flag, what in refused:
            if flag:
                raise UnsupportedConfigError(f"--kv-cache-dtype {DTYPE} does not support {what}")
        ops.load_kernels()  # a missing extension stops the worker at startup, not at the first request
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.num_queries_per_kv = self.num_heads // self.num_kv_heads

    def bind(self, fmt: kvformat.LayerFormat, ring_name: str | None) -> None:
        self.fmt = fmt
        self.ring_name = ring_name

    def _ring(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's (ring cache, ring block per request), or (None, None) without a window."""
        if self.ring_name is None:
            return None, None
        context = get_forward_context()
        return context.no_compile_layers[self.ring_name].kv_cache, context.attn_metadata[self.ring_name].block_ids

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        md = metadata[layer.layer_name] if isinstance(metadata, dict) else None
        if md is None:  # profiling run: no cache yet
            return
        ring_cache, ring_ids = self._ring()
        ops.quantize_and_cache(key, value, kv_cache, slot_mapping, self.fmt, md.query_start_loc, md.seq_lens,
                               ring_cache, ring_ids)

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
        if attn_metadata is None:  # profiling run: no cache yet; a defined output for the layers after it
            return output.zero_()
        md = attn_metadata
        n = md.num_actual_tokens
        ring_cache, ring_ids = self._ring()
        ops.paged_attention(output[:n], query[:n], key[:n], value[:n], kv_cache, md.block_table, md.seq_lens,
                            md.query_start_loc, md.max_query_len, md.max_seq_len, self.scale, self.fmt,
                            ring_cache, ring_ids, softcap=self.logits_soft_cap, workspace=md.workspace)
        if ring_cache is not None:  # after attention: this step's rows read themselves from key/value
            ops.write_window(key[:n], value[:n], ring_cache, ring_ids, md.query_start_loc, md.seq_lens, self.fmt)
        return output
