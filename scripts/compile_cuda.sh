#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with `nvcc -c` for the targets setup.py builds (SASS for
# sm_80/86/89/90, PTX for compute_90): no link, no GPU needed. CI runs this on machines with
# nvcc and the CPU torch wheel. The wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h,
# so a one-line stand-in goes into a build-only include directory (see docs/cuda-without-gpu.md).
# The torch-free files are compiled a second time, for sm_90 only, with the debug checks on
# (KVTUNER_DEBUG_CHECKS=1), so that build cannot rot either.
# Usage: bash scripts/compile_cuda.sh [file.cu ...]   (default: all of csrc/cuda/*.cu)
# COMPILE_JOBS (default: the CPU count) files compile at once; nvcc's output is shown
# only for files that fail. Exits non-zero if any file fails.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[[ -x "$NVCC" ]] || { echo "compile_cuda: nvcc not found" >&2; exit 1; }
jobs_max="${COMPILE_JOBS:-$(nproc)}"

read -r torch_include python_include < <(python - <<'PY'
import os, sysconfig, torch
print(os.path.join(os.path.dirname(torch.__file__), "include"), sysconfig.get_paths()["include"])
PY
)

build="$(mktemp -d "${TMPDIR:-/tmp}/kvtuner-cuda.XXXXXX")"
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/include/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$build/include/c10/cuda/impl/cuda_cmake_macros.h"

arch_flags=()
for arch in 80 86 89 90; do arch_flags+=("-gencode=arch=compute_$arch,code=sm_$arch"); done  # setup.py CUDA_ARCHS
arch_flags+=("-gencode=arch=compute_90,code=compute_90")
debug_flags=("-gencode=arch=compute_90,code=sm_90" -DKVTUNER_DEBUG_CHECKS=1)

flags=(
  -c -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo
  -I"$build/include" -I"$repo/csrc"
  -I"$torch_include" -I"$torch_include/torch/csrc/api/include" -I"$python_include"
  -D_GLIBCXX_USE_CXX11_ABI=1 -DKVTUNER_WITH_CUDA
  -Xcompiler -fPIC
)

# Sets cpu_seconds to the CPU time of this (sub)shell's finished children. `times` must run
# in the shell itself (a command substitution is a fresh subshell), so it goes via a file.
measure_cpu() {
  local file="$build/times.$BASHPID"
  times > "$file"
  cpu_seconds=$(awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, t, "m"); s += t[1] * 60 + t[2] }
                               printf "%.0f", s }' "$file")
}

# Runs in a background subshell: `times` there counts only this file's nvcc.
# Usage: compile_one SOURCE VARIANT (release | debug)
compile_one() {
  local src=$1 variant=$2 name start=$SECONDS
  local -a targets=("${arch_flags[@]}")
  [[ $variant == debug ]] && targets=("${debug_flags[@]}")
  name="$(basename "$src" .cu).$variant"
  if "$NVCC" "${flags[@]}" "${targets[@]}" "$src" -o "$build/$name.o" > "$build/$name.log" 2>&1; then
    measure_cpu
    echo "compile_cuda: ok   $src [$variant] ($((SECONDS - start)) s wall, $cpu_seconds s cpu)"
  else
    cat "$build/$name.log" >&2
    echo "compile_cuda: FAIL $src [$variant] ($((SECONDS - start)) s wall)" >&2
    touch "$build/$name.failed"
  fi
}

if (($#)); then sources=("$@"); else sources=(csrc/cuda/*.cu); fi
[[ -e "${sources[0]}" ]] || { echo "compile_cuda: no .cu files under csrc/cuda" >&2; exit 1; }

jobs_list=()
for src in "${sources[@]}"; do
  jobs_list+=("$src release")
  # Torch-free files (all but the launchers) also build with the debug checks.
  grep -qE '^#include <(ATen|c10|torch)/' "$src" || jobs_list+=("$src debug")
done

total_start=$SECONDS
for job in "${jobs_list[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs_max)); do wait -n || true; done
  read -r src variant <<< "$job"
  compile_one "$src" "$variant" &
done
wait
measure_cpu
echo "compile_cuda: ${#jobs_list[@]} compilation(s) of ${#sources[@]} file(s) in $((SECONDS - total_start)) s wall, $cpu_seconds s cpu, $jobs_max job(s)"
if compgen -G "$build/*.failed" > /dev/null; then exit 1; fi
