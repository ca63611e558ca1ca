"""The CUDA backend: the shared impl on the CUDA kernels, with full CUDA graphs for uniform batches.

The kernels' grid depends only on the batch's sequence and token counts, the head counts and
`max_query_len` (csrc/cuda/kernels/work_split.h), and they read lengths, block tables and ring blocks from
device memory that vLLM (and ring.RingMetadataBuilder) keep at fixed addresses, so a captured
decode step replays correctly: the builder declares AttentionCGSupport.UNIFORM_BATCH. The split-key
scratch comes from vLLM's workspace manager, reserved at its largest size when the builder is made,
so every step (and every replay) passes the same buffer.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport
from vllm.v1.worker.workspace import current_workspace_manager

from kvtuner_vllm import ops
from kvtuner_vllm.backend.common import KVTunerBackendMixin, KVTunerMetadataBuilder


class KVTunerCUDAMetadataBuilder(KVTunerMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        num_q_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.workspace_bytes = ops.max_attention_workspace_size(num_q_heads, kv_cache_spec.num_kv_heads,
                                                                kv_cache_spec.head_size)
        self._workspace()  # reserved now, before vLLM locks the workspace for execution

    def _workspace(self) -> torch.Tensor | None:
        if self.workspace_bytes == 0:
            return None
        (workspace,) = current_workspace_manager().get_simultaneous(((self.workspace_bytes,), torch.uint8))
        return workspace

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata.workspace = self._workspace()
        return metadata


class KVTunerCUDABackend(KVTunerBackendMixin, AttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[KVTunerCUDAMetadataBuilder]:
        return KVTunerCUDAMetadataBuilder
