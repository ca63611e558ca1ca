#!/usr/bin/env bash
# Lint, then the whole test suite, in the venv made by scripts/setup.sh (README command 2 runs both).
# Fails on lint errors, test failures, and on pytest's exit 5 ("no tests ran").
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
[ -x "$VENV/bin/pytest" ] || { echo "test: $VENV has no pytest; run: bash scripts/setup.sh" >&2; exit 1; }
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"

echo "[test] ruff check"
ruff check .

echo "[test] pytest"
status=0
pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing" >&2
fi
exit "$status"
