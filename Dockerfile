# kvtuner-vllm on CUDA: the official vLLM OpenAI server image of the one vLLM release we support
# (kvtuner_vllm.SUPPORTED_VLLM), with the kernels built for Ampere and Hopper (PTX for newer GPUs).
#   docker build -t kvtuner-vllm .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#       kvtuner-vllm MODEL --kv-cache-dtype kvtuner
# Not built in this project's CI (no docker engine there); tests/test_packaging.py checks what it can.
FROM vllm/vllm-openai:v0.32.0

# The runtime image may lack the CUDA compiler: add the one matching its torch from NVIDIA's apt repo.
RUN if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then \
        cuda="$(python3 -c 'import torch; print(torch.version.cuda.replace(".", "-"))')" \
        && apt-get update \
        && apt-get install -y --no-install-recommends \
            "cuda-nvcc-$cuda" "cuda-cudart-dev-$cuda" "cuda-cccl-$cuda" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH

WORKDIR /opt/kvtuner-vllm
COPY pyproject.toml setup.py README.md ./
COPY csrc ./csrc
COPY kvtuner_vllm ./kvtuner_vllm
COPY calibration ./calibration

# sm80 (A100), sm86 (A10/RTX 30xx), sm89 (L4/RTX 40xx), sm90 (H100): setup.py's CUDA_ARCHS, whose
# build adds compute_90 PTX that the driver compiles for newer GPUs.
ENV TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0" \
    KVTUNER_BUILD_CUDA=1 \
    MAX_JOBS=4
# Build against the image's own torch and vLLM (no build isolation). The checks run from / so that
# the installed package, not this source folder, is imported.
RUN if command -v uv >/dev/null; then uv pip install --system --no-build-isolation ".[calibration]"; \
    else python3 -m pip install --no-cache-dir --no-build-isolation ".[calibration]"; fi \
    && cd / && python3 -c "from kvtuner_vllm.ops import load_kernels; load_kernels()" \
    && kvtuner-vllm --version

ENTRYPOINT ["vllm", "serve"]
