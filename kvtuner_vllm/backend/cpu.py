"""The CPU backend: vLLM's CPU backend class (dtypes, causal and non-causal flags) with our
dtype, layout, impl and builder."""

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from kvtuner_vllm.backend.common import KVTunerBackendMixin


class KVTunerCPUBackend(KVTunerBackendMixin, CPUAttentionBackend):
    pass
