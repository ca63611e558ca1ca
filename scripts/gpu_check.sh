#!/usr/bin/env bash
# The CUDA kernels on a real GPU, in one run on a bare CUDA machine (PyTorch with CUDA, nvcc,
# ninja, compute-sanitizer; no vLLM, no network), from a copy of the working tree:
#   env       what the machine has (GPU, driver, torch, nvcc, sanitizer)            -> env.json
#   build     setup.py build_ext --inplace, CUDA on, only this card's arch (+ PTX)   -> build.log
#   tests     pytest tests/kernels, the CUDA cases: the reference tests on device
#             "cuda" and the emulator's scenarios on the real kernels               -> tests.log
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over a few small
#             cases (scripts/gpu_sanitize.py, outputs checked too)                  -> sanitize.log
#   bench     benchmarks/kernels/cuda_decode.py (packed vs KV16 vs SDPA, copy GB/s)  -> cuda_decode.json
# Each phase runs unless one it needs failed, under its own time cap (8 minutes in all on an
# H100); the summary (printed, and summary.json) names every failure; exit status 1 if any.
#
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else ./gpu-check)
#        GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh DIR   the script's own logic on a machine
#        without a GPU: no build, the emulator instead of the GPU, the benchmark's CPU dry run.
# PYTHON (default python3) is the interpreter that holds torch.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
out="${1:-${OUT:-$repo/gpu-check}}"
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"
PYTHON="${PYTHON:-python3}"
dry_run="${GPU_CHECK_DRY_RUN:-0}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

log() { echo "[gpu_check +${SECONDS}s] $*"; }

declare -A status note seconds
phases=()

# run_phase NAME CAP_SECONDS LOG_FILE COMMAND...: runs the command under `timeout`, its output to
# LOG_FILE (appended); on failure prints the log's tail. Sets status[NAME] to ok / FAILED / TIMEOUT.
run_phase() {
  local name=$1 cap=$2 logfile=$3 start=$SECONDS rc
  shift 3
  log "$name: $* (cap ${cap}s)"
  # bash -c: the commands are this script's functions (exported below); timeout signals the
  # whole process group, so the phase's compilers and pythons stop with it.
  timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" >> "$logfile" 2>&1
  rc=$?
  seconds[$name]=$((SECONDS - start))
  if ((rc == 0)); then
    status[$name]=ok
  else
    if ((rc == 124 || rc == 137)); then status[$name]=TIMEOUT; else status[$name]=FAILED; fi
    note[$name]="exit $rc, see $(basename "$logfile")"
    log "$name: ${status[$name]} (exit $rc); last lines of $(basename "$logfile"):"
    tail -n 25 "$logfile" | sed 's/^/    /'
  fi
  phases+=("$name")
  log "$name: ${status[$name]} in ${seconds[$name]}s"
  [[ ${status[$name]} == ok ]]
}

skip_phase() {  # NAME REASON
  status[$1]=SKIPPED
  note[$1]=$2
  seconds[$1]=0
  phases+=("$1")
  log "$1: skipped ($2)"
}

# ------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------
env_report() {
  "$PYTHON" - "$out/env.json" "$dry_run" <<'PY'
import json, shutil, subprocess, sys
import torch

def tool(*cmd):
    if shutil.which(cmd[0]) is None:
        return None
    run = subprocess.run(cmd, capture_output=True, text=True)
    return (run.stdout + run.stderr).strip().splitlines()[-3:]

info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "nvcc": tool("nvcc", "--version"), "compute_sanitizer": tool("compute-sanitizer", "--version"),
        "ninja": tool("ninja", "--version"), "gxx": tool("g++", "--version"),
        "nvidia_smi": tool("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader")}
try:
    import vllm  # noqa: F401
    info["vllm"] = "importable (not needed)"
except ImportError:
    info["vllm"] = "absent (as expected)"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"{props.major}{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1))
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
if not info["cuda_available"] and sys.argv[2] != "1":
    sys.exit("gpu_check: torch sees no CUDA device")
PY
}

export -f env_report
export out dry_run scratch PYTHON
run_phase env 30 "$scratch/env.log" env_report
env_ok=$?
cat "$scratch/env.log"
arch="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("capability", ""))' "$out/env.json" \
        2>/dev/null)"
export arch

# ------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------
build_extension() {
  KVTUNER_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" KVTUNER_CUDA_ARCHS="$arch" \
    "$PYTHON" setup.py build_ext --inplace || return 1
  "$PYTHON" - <<'PY'
import torch
from kvtuner_vllm import ops
ops.load_kernels()
for op in ("quantize_and_cache", "paged_attention", "write_window"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvtuner::{op}", "CUDA"), f"no CUDA kernel for {op}"
print("gpu_check: kvtuner_vllm._C loads, CUDA kernels registered")
PY
}

export -f build_extension
build_ok=1
if [[ $dry_run == 1 ]]; then
  skip_phase build "dry run"
  build_ok=0
elif ((env_ok != 0)) || [[ -z $arch ]]; then
  skip_phase build "no CUDA device"
else
  run_phase build 170 "$out/build.log" build_extension
  build_ok=$?
fi

# ------------------------------------------------------------------------------------------
# tests: the CUDA cases of tests/kernels (the CPU ones are CI's)
# ------------------------------------------------------------------------------------------
cuda_tests() {
  local selection="(cuda and not emulated) or on_gpu"
  [[ $dry_run == 1 ]] && selection="test_scenario and kivi"  # the emulator stands in for the GPU
  "$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider -k "$selection" --junitxml="$scratch/junit.xml"
  local rc=$?
  ((rc == 0)) || return $rc
  "$PYTHON" - "$scratch/junit.xml" "$dry_run" <<'PY'
import sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).iter("testcase"))
device = [c for c in cases if "cuda" in c.get("name", "") or "on_gpu" in c.get("name", "")]
if sys.argv[2] == "1":
    device = cases
ran = [c for c in device if not any(child.tag in ("skipped", "failure", "error") for child in c)]
print(f"gpu_check: {len(ran)} device test(s) passed of {len(cases)} selected")
if not ran:
    sys.exit("gpu_check: no test ran on the GPU (are the kernel tests parametrized by kernel_cases.DEVICES?)")
PY
}

export -f cuda_tests
if ((build_ok == 0)); then
  run_phase tests 100 "$out/tests.log" cuda_tests
else
  skip_phase tests "the build failed"
fi

# ------------------------------------------------------------------------------------------
# sanitize
# ------------------------------------------------------------------------------------------
sanitize() {  # TOOL SCENARIOS
  local tool=$1 scenarios=$2
  echo "===== $tool: $scenarios"
  if [[ $dry_run == 1 ]]; then
    "$PYTHON" scripts/gpu_sanitize.py --emulator --scenarios "$scenarios"
    return
  fi
  local filter=()
  # Only our kernels (names in namespace kvtuner): faster, and torch's own are not ours to judge.
  if compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then filter=(--kernel-name kns=kvtuner); fi
  compute-sanitizer --tool "$tool" --error-exitcode 99 "${filter[@]}" \
    "$PYTHON" scripts/gpu_sanitize.py --scenarios "$scenarios"
}

export -f sanitize
if ((build_ok != 0)); then
  skip_phase memcheck "the build failed"
  skip_phase racecheck "the build failed"
  skip_phase synccheck "the build failed"
elif [[ $dry_run != 1 ]] && ! command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do skip_phase $tool "compute-sanitizer not found"; done
else
  run_phase memcheck 50 "$out/sanitize.log" sanitize memcheck window-mixed,kivi,head80-fp16,spec-decode-gqa5
  run_phase racecheck 45 "$out/sanitize.log" sanitize racecheck window-mixed,kivi
  run_phase synccheck 30 "$out/sanitize.log" sanitize synccheck window-mixed,decode-split-v1
fi

# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------
if [[ $dry_run == 1 ]]; then
  run_phase bench 60 "$out/bench.log" "$PYTHON" -m benchmarks.kernels.cuda_decode --dry-run --out "$out" --budget-s 5
elif ((build_ok == 0)); then
  run_phase bench 60 "$out/bench.log" "$PYTHON" -m benchmarks.kernels.cuda_decode --out "$out" --budget-s 40
else
  skip_phase bench "the build failed"
fi
[[ -f $out/bench.log ]] && grep -v '^cuda_decode: batch' "$out/bench.log" | tail -n 40

# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------
failed=0
echo
echo "==================== gpu_check summary (${SECONDS}s, results in $out) ===================="
summary_args=()
for name in "${phases[@]}"; do
  printf '  %-10s %-8s %5ss  %s\n' "$name" "${status[$name]}" "${seconds[$name]}" "${note[$name]:-}"
  summary_args+=("$name" "${status[$name]}" "${seconds[$name]}" "${note[$name]:-}")
  [[ ${status[$name]} == ok || ${status[$name]} == SKIPPED && $dry_run == 1 ]] || failed=1
done
"$PYTHON" - "$out/summary.json" "$SECONDS" "$dry_run" "${summary_args[@]}" <<'PY'
import json, sys
path, total, dry_run, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
phases = [{"phase": rest[i], "status": rest[i + 1], "seconds": int(rest[i + 2]), "note": rest[i + 3]}
          for i in range(0, len(rest), 4)]
json.dump({"seconds": total, "dry_run": dry_run, "phases": phases}, open(path, "w"), indent=2)
PY
if ((failed)); then
  echo "gpu_check: FAILED (see the phases above)"
  exit 1
fi
echo "gpu_check: all phases passed"
