"""The CUDA backend. Its builder keeps vLLM's default cudagraph support (NEVER), so CUDA graphs
run piecewise around the attention op: the kernels take host-side max lengths per step."""

from vllm.v1.attention.backend import AttentionBackend

from kvtuner_vllm.backend.common import KVTunerBackendMixin


class KVTunerCUDABackend(KVTunerBackendMixin, AttentionBackend):
    pass
