"""vLLM attention backends for --kv-cache-dtype kvtuner: `cpu.KVTunerCPUBackend` and
`cuda.KVTunerCUDABackend`, both running the impl in `common` on the kernels of kvtuner_vllm.ops."""
