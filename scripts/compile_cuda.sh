#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with `nvcc -c` for sm80 and sm90: no link, no GPU needed.
# CI runs this on machines with nvcc and the CPU torch wheel. The wheel lacks the
# generated c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in goes into a
# build-only include directory (see /work/shared/design/cuda-without-gpu.md).
# Usage: bash scripts/compile_cuda.sh [file.cu ...]   (default: all of csrc/cuda/*.cu)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[[ -x "$NVCC" ]] || { echo "compile_cuda: nvcc not found" >&2; exit 1; }

read -r torch_include python_include < <(python - <<'PY'
import os, sysconfig, torch
print(os.path.join(os.path.dirname(torch.__file__), "include"), sysconfig.get_paths()["include"])
PY
)

build="$(mktemp -d "${TMPDIR:-/tmp}/kvtuner-cuda.XXXXXX")"
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/include/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$build/include/c10/cuda/impl/cuda_cmake_macros.h"

flags=(
  -c -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
  -I"$build/include" -I"$repo/csrc"
  -I"$torch_include" -I"$torch_include/torch/csrc/api/include" -I"$python_include"
  -D_GLIBCXX_USE_CXX11_ABI=1 -DKVTUNER_WITH_CUDA
  -Xcompiler -fPIC
)

if (($#)); then sources=("$@"); else sources=(csrc/cuda/*.cu); fi
[[ -e "${sources[0]}" ]] || { echo "compile_cuda: no .cu files under csrc/cuda" >&2; exit 1; }

failed=0
total_start=$SECONDS
for src in "${sources[@]}"; do
  start=$SECONDS
  if "$NVCC" "${flags[@]}" "$src" -o "$build/$(basename "$src" .cu).o"; then
    echo "compile_cuda: ok   $src ($((SECONDS - start)) s)"
  else
    echo "compile_cuda: FAIL $src ($((SECONDS - start)) s)" >&2
    failed=1
  fi
done
echo "compile_cuda: ${#sources[@]} file(s) in $((SECONDS - total_start)) s"
exit "$failed"
