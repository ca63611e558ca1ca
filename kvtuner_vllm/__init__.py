"""Layer-wise mixed-precision KV cache quantization for vLLM (KVTuner)."""

__version__ = "0.1.0"
