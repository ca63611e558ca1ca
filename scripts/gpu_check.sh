#!/usr/bin/env bash
# The CUDA kernels on a real GPU, in one run on a bare CUDA machine (PyTorch with CUDA, nvcc,
# ninja, compute-sanitizer; no vLLM, no network, maybe no pytest, any setuptools), from a copy
# of the working tree:
#   env       what the machine has (GPU, driver, torch, nvcc, sanitizer, pytest)    -> env.json, env.log
#   wheels    pytest (and setuptools, if the image has none) from the carried
#             .gpu-wheels/ into a throwaway folder, only when the image lacks them  -> wheels.log
#   build     the extension JIT-compiled by torch.utils.cpp_extension.load (ninja) from
#             setup.py's own sources and flags (read by running setup.py with setup() stubbed:
#             no setuptools build, so its version does not matter), CUDA on, only this
#             card's arch (+ PTX); build/gpu-check/ is kept for a rerun              -> build.log
#   tests     pytest tests/kernels, the CUDA cases (~390: the reference tests on device
#             "cuda", the emulator's scenarios on the real kernels), in parallel shards -> tests.log
#   graphs    quantize_and_cache, paged_attention and write_window captured in CUDA graphs
#             and replayed step after step, outputs checked; a failed capture fails
#             (scripts/gpu_sanitize.py --graphs)                                     -> graphs.log
#   memcheck, racecheck, synccheck: compute-sanitizer over a few small cases
#             (scripts/gpu_sanitize.py, outputs checked too)                         -> sanitize.log
#   bench     benchmarks/kernels/cuda_decode.py --require-graphs (packed vs KV16 vs SDPA,
#             copy GB/s; a failed capture fails), as long as the budget allows       -> cuda_decode.json
# Each phase runs unless one it needs failed, under its own time cap, and every cap is cut to
# what the whole run's budget (GPU_CHECK_BUDGET_S, default 540 s) leaves after the later phases'
# minimum; a phase with no time left fails as NO_TIME. The summary (printed last, and
# summary.json) names every failure; exit status 1 if any.
#
# On the lent GPU machine (the session's `run` tool; 15 minutes of device time in all, the
# machine's start included, so one full run):
#   here, first: bash scripts/gpu_wheels.sh      # -> .gpu-wheels/ (9 wheels, ~3 MiB, gitignored)
#   then:        run(command="bash scripts/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
#   Results in $OUT: summary.json, env.json, the phases' logs, cuda_decode.json.
#   If device time is left, a rerun of some phases on the still-warm machine (the build is
#   incremental, or reused when not selected), e.g. after a fix:
#                run(command="GPU_CHECK_PHASES='build tests' GPU_CHECK_BUDGET_S=300 bash scripts/gpu_check.sh",
#                    carry=[".gpu-wheels"], timeout_s=360)
#
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else ./gpu-check)
#        GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh DIR   the script's own logic on a machine
#        without a GPU: the CPU extension built the same way (into build/gpu-check-cpu, not
#        installed), the emulator instead of the GPU (graphs: a stand-in that re-runs the
#        captured calls), the benchmark's CPU dry run; caps and budget 4 times longer.
# Settings: PYTHON (the interpreter that holds torch; default .venv/bin/python where there is
#   one, as on the development machines, else python3); GPU_CHECK_BUDGET_S;
#   GPU_CHECK_PHASES (the phases to run, the rest SKIPPED; default all; env and wheels always run);
#   GPU_CHECK_WHEELS (default .gpu-wheels); GPU_CHECK_FORCE_WHEELS=1 installs pytest from the
#   wheels even if the image has it (GPU_CHECK_NO_PIP=1: by unpacking them, as without pip);
#   GPU_CHECK_TEST_SHARDS (parallel pytest processes; default nproc/4, at most 4).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
out="${1:-${OUT:-$repo/gpu-check}}"
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"
# This run's files only (the logs are appended to phase by phase).
rm -f "$out"/{summary.json,env.json,env.log,wheels.log,build.log,tests.log,graphs.log,sanitize.log,bench.log} \
  "$out"/cuda_decode.json "$out"/cuda_decode_dry_run.json
PYTHON="${PYTHON:-$([[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || echo python3)}"
dry_run="${GPU_CHECK_DRY_RUN:-0}"
# Caps and budget in seconds for the GPU machine; the dry run's CPU build and emulator are slower.
scale=1
[[ $dry_run == 1 ]] && scale=4
budget="${GPU_CHECK_BUDGET_S:-$((540 * scale))}"
only="${GPU_CHECK_PHASES:-}"
for name in $only; do
  case " env wheels build tests graphs memcheck racecheck synccheck bench " in
    *" $name "*) ;;
    *) echo "gpu_check: unknown phase '$name' in GPU_CHECK_PHASES" \
            "(env wheels build tests graphs memcheck racecheck synccheck bench)" >&2; exit 2 ;;
  esac
done
wheels="${GPU_CHECK_WHEELS:-$repo/.gpu-wheels}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
deps="$scratch/pydeps"  # what the wheels phase installs: deps/pytest (tests), deps/setuptools (build on)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export out dry_run scratch PYTHON wheels deps repo

log() { echo "[gpu_check +${SECONDS}s] $*"; }

declare -A status note seconds
phases=()
failed_phases=" "

skip_phase() {  # NAME STATUS REASON
  status[$1]=$2
  note[$1]=$3
  seconds[$1]=0
  phases+=("$1")
  [[ $2 == SKIPPED ]] || failed_phases+="$1 "
  log "$1: $2 ($3)"
}

# run_phase NAME CAP RESERVE LOG_FILE COMMAND...: runs the command under `timeout`, its output
# to LOG_FILE (appended); on failure prints the log's tail. The cap is cut to the budget left
# after RESERVE seconds for the phases after this one (both scaled by $scale); the command sees
# the cap as $PHASE_CAP. Sets status[NAME] to ok / FAILED / TIMEOUT / NO_TIME, or SKIPPED when
# GPU_CHECK_PHASES leaves it out (env and wheels always run); returns 0 only for ok.
run_phase() {
  local name=$1 cap=$(($2 * scale)) reserve=$(($3 * scale)) logfile=$4 start=$SECONDS rc left
  shift 4
  if [[ -n $only && " $only env wheels " != *" $name "* ]]; then
    skip_phase "$name" SKIPPED "not in GPU_CHECK_PHASES"
    return 2
  fi
  left=$((budget - SECONDS - reserve))
  ((left < cap)) && cap=$left
  if ((cap < 10)); then
    skip_phase "$name" NO_TIME "${left}s of the ${budget}s budget left after the later phases' ${reserve}s"
    return 1
  fi
  log "$name: $* (cap ${cap}s)"
  # bash -c: the commands are this script's functions (exported below); timeout signals the
  # whole process group, so the phase's compilers and pythons stop with it.
  PHASE_CAP=$cap timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" >> "$logfile" 2>&1
  rc=$?
  seconds[$name]=$((SECONDS - start))
  if ((rc == 0)); then
    status[$name]=ok
  else
    if ((rc == 124 || rc == 137)); then status[$name]=TIMEOUT; else status[$name]=FAILED; fi
    note[$name]="exit $rc, see $(basename "$logfile")"
    failed_phases+="$name "
    log "$name: ${status[$name]} (exit $rc); last lines of $(basename "$logfile"):"
    tail -n 25 "$logfile" | sed 's/^/    /'
  fi
  phases+=("$name")
  log "$name: ${status[$name]} in ${seconds[$name]}s"
  [[ ${status[$name]} == ok ]]
}

# A phase that needs an earlier one: SKIPPED under GPU_CHECK_PHASES, else a failure that names why.
blocked() {  # NAME REASON
  if [[ -n $only && " $only " != *" $1 "* ]]; then
    skip_phase "$1" SKIPPED "not in GPU_CHECK_PHASES"
  else
    skip_phase "$1" BLOCKED "$2"
  fi
}

# ------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------
env_report() {
  "$PYTHON" - "$out/env.json" "$dry_run" <<'PY'
import importlib.util, json, os, platform, shutil, subprocess, sys
import torch

def tool(*cmd):
    if shutil.which(cmd[0]) is None:
        return None
    run = subprocess.run(cmd, capture_output=True, text=True)
    return (run.stdout + run.stderr).strip().splitlines()[-3:]

def version(module):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "importable")
    except Exception as error:  # noqa: BLE001
        return f"import fails: {error}"

info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
        "pytest": version("pytest"), "setuptools": version("setuptools"),
        "nvcc": tool("nvcc", "--version"), "compute_sanitizer": tool("compute-sanitizer", "--version"),
        "ninja": tool("ninja", "--version"), "gxx": tool("g++", "-dumpfullversion"),
        "nvidia_smi": tool("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader")}
info["vllm"] = "installed (not needed)" if importlib.util.find_spec("vllm") else "absent (as expected)"
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
run_phase env 45 400 "$out/env.log" env_report
env_ok=$?
cat "$out/env.log" 2> /dev/null
arch="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("capability", ""))' "$out/env.json" \
        2>/dev/null)"
export arch

# ------------------------------------------------------------------------------------------
# wheels: pytest (tests phase) and setuptools (torch.utils.cpp_extension imports it), from the
# carried wheels, each into its own folder under $deps, only when the image lacks them. The
# image's packages stay as they are (pip --target writes nothing outside the folder), and each
# folder goes on PYTHONPATH only where it is needed: pytest's (with pytest's own packaging etc.)
# in the tests phase, setuptools' from the build on.
# ------------------------------------------------------------------------------------------
install_wheels() {
  local want=()
  if [[ ${GPU_CHECK_FORCE_WHEELS:-0} == 1 ]]; then
    want+=(pytest)
    echo "gpu_check: GPU_CHECK_FORCE_WHEELS=1: pytest from the wheels whatever the image has"
  elif "$PYTHON" -c 'import sys, pytest; sys.exit(int(pytest.__version__.split(".")[0]) < 7)' 2> /dev/null; then
    echo "gpu_check: pytest $("$PYTHON" -c 'import pytest; print(pytest.__version__)') from the image"
  else  # none, or older than 7 (pyproject's `pythonpath` ini option)
    want+=(pytest)
  fi
  if ! "$PYTHON" -c 'import setuptools' 2> /dev/null; then  # torch.utils.cpp_extension imports it
    echo "gpu_check: no setuptools, which torch.utils.cpp_extension imports"
    want+=(setuptools)
  fi
  ((${#want[@]})) || return 0
  if ! compgen -G "$wheels/*.whl" > /dev/null; then
    echo "gpu_check: the image lacks ${want[*]} and $wheels holds no wheels: run 'bash scripts/gpu_wheels.sh'" \
         "where there is network and carry .gpu-wheels with the tree"
    return 1
  fi
  local name pip=1
  "$PYTHON" -m pip --version > /dev/null 2>&1 || pip=0
  [[ ${GPU_CHECK_NO_PIP:-0} == 1 ]] && pip=0  # the fallback, as on an image without pip (tests)
  for name in "${want[@]}"; do
    echo "gpu_check: installing $name from $wheels into $deps/$name"
    if ((pip)); then
      "$PYTHON" -m pip install --disable-pip-version-check --no-index --find-links "$wheels" --only-binary=:all: \
        --no-compile --no-warn-script-location --target "$deps/$name" "$name" || return 1
    else  # no pip: the wheels are pure Python, unpacking them is installing them (all but setuptools
          # for pytest: its requirements without a resolver; surplus ones are harmless)
      "$PYTHON" - "$wheels" "$deps/$name" "$name" <<'PY' || return 1
import sys, zipfile
from pathlib import Path
wheels, target, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print("gpu_check: no pip; unpacking the wheels")
for wheel in sorted(wheels.glob("*.whl")):
    if (wheel.name.split("-")[0] == "setuptools") == (name == "setuptools"):
        zipfile.ZipFile(wheel).extractall(target)
        print(f"  {wheel.name}")
PY
    fi
    PYTHONPATH="$deps/$name:$PYTHONPATH" "$PYTHON" - "$deps/$name" "$name" <<'PY' || return 1
import importlib, sys
folder, name = sys.argv[1:]
module = importlib.import_module(name)
assert module.__file__.startswith(folder + "/"), f"{name} imported from {module.__file__}, not {folder}"
print(f"gpu_check: {name} {module.__version__} from {module.__file__}")
if name == "setuptools":
    import torch.utils.cpp_extension  # noqa: F401
PY
  done
}

export -f install_wheels
run_phase wheels 45 400 "$out/wheels.log" install_wheels
wheels_ok=$?
cat "$out/wheels.log"
[[ -d $deps/setuptools ]] && export PYTHONPATH="$deps/setuptools:$PYTHONPATH"

# ------------------------------------------------------------------------------------------
# build: setup.py's extension, compiled by torch.utils.cpp_extension.load (ninja). setup.py is
# run with setup() and the Extension classes replaced by recorders, so its sources and flags
# are the ones used here and no setuptools version matters.
# ------------------------------------------------------------------------------------------
build_extension() {
  local build_dir=$repo/build/gpu-check cuda=1
  if [[ $dry_run == 1 ]]; then build_dir=$repo/build/gpu-check-cpu cuda=0; fi
  mkdir -p "$build_dir" && rm -f "$build_dir/lock"  # a lock left by a killed build would block load()
  KVTUNER_BUILD_CUDA=$cuda KVTUNER_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" - "$build_dir" "$dry_run" <<'PY' || return 1
import importlib.util, os, runpy, shlex, shutil, sys, sysconfig, time, types
from pathlib import Path
import torch
import torch.utils.cpp_extension as cpp

build_dir, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"
made = []

def recorder(kind):
    def extension(name, sources, **kwargs):
        made.append(dict(kind=kind, name=name, sources=list(sources), **kwargs))
        return made[-1]
    return extension

real = sys.modules["setuptools"], cpp.CppExtension, cpp.CUDAExtension
sys.modules["setuptools"] = types.SimpleNamespace(setup=lambda **kwargs: None)
cpp.CppExtension, cpp.CUDAExtension = recorder("cpp"), recorder("cuda")
try:
    runpy.run_path("setup.py", run_name="gpu_check")
finally:
    sys.modules["setuptools"], cpp.CppExtension, cpp.CUDAExtension = real
(ext,) = made
with_cuda = ext["kind"] == "cuda"
assert with_cuda != dry_run, f"setup.py chose a {ext['kind']} extension"
macros = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in ext.get("define_macros", [])]
flags = ext.get("extra_compile_args", {})
# load() writes the flags into build.ninja unquoted (a shell runs them): quote each one.
quote = lambda args: [shlex.quote(a) for a in args]  # noqa: E731
print(f"gpu_check: building {ext['name']} ({ext['kind']}, {len(ext['sources'])} sources) in {build_dir}", flush=True)
start = time.time()
module = cpp.load(name=ext["name"].rpartition(".")[2], sources=[os.path.abspath(s) for s in ext["sources"]],
                  extra_cflags=quote(flags.get("cxx", []) + macros),
                  extra_cuda_cflags=quote(flags.get("nvcc", []) + macros) if with_cuda else None,
                  extra_ldflags=ext.get("extra_link_args", []), extra_include_paths=ext.get("include_dirs", []),
                  build_directory=str(build_dir), with_cuda=with_cuda, verbose=True)
print(f"gpu_check: built {module.__file__} in {time.time() - start:.0f} s")
if dry_run:  # the tree's own build (pip install -e .) stays in place
    Path(build_dir, "built").write_text(module.__file__)
else:
    target = Path("kvtuner_vllm", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    for stale in Path("kvtuner_vllm").glob("_C.*so"):
        stale.unlink()
    shutil.copy2(module.__file__, target)
    print(f"gpu_check: installed as {target}")
PY
  # A fresh process, as the tests will: the module imports as kvtuner_vllm._C and registers the ops.
  "$PYTHON" - "$build_dir" "$dry_run" <<'PY'
import importlib.util, sys
from pathlib import Path
import torch

build_dir, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"
if dry_run:
    spec = importlib.util.spec_from_file_location("kvtuner_vllm._C", Path(build_dir, "built").read_text())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["kvtuner_vllm._C"] = module
from kvtuner_vllm import ops
ops.load_kernels()
key = "CPU" if dry_run else "CUDA"
for op in ("quantize_and_cache", "paged_attention", "write_window"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvtuner::{op}", key), f"no {key} kernel for {op}"
import kvtuner_vllm._C as ext
print(f"gpu_check: {ext.__file__} loads (built for torch {ext.torch_version}), {key} kernels registered")
PY
}

export -f build_extension
build_why="the build failed"
if ((env_ok != 0)); then
  blocked build "the env phase failed"
  build_ok=1
elif [[ $dry_run != 1 && -z $arch ]]; then
  blocked build "no CUDA device"
  build_ok=1
else
  run_phase build 240 290 "$out/build.log" build_extension
  build_ok=$?
  suffix=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  ((build_ok == 2)) && [[ -f $repo/kvtuner_vllm/_C$suffix ]] && build_ok=0  # not selected: an earlier build is used
  ((build_ok == 2)) && build_why="no build (not in GPU_CHECK_PHASES, none from an earlier run)"
fi
tail -n 3 "$out/build.log" 2> /dev/null

# ------------------------------------------------------------------------------------------
# tests: the CUDA cases of tests/kernels (the CPU ones are CI's), in parallel pytest processes
# (the references run on the CPU and take most of the time), node ids dealt round-robin
# ------------------------------------------------------------------------------------------
cuda_tests() {
  [[ -d $deps/pytest ]] && export PYTHONPATH="$deps/pytest:$PYTHONPATH"
  local selection="(cuda and not emulated and not test_cuda_sources) or on_gpu"
  [[ $dry_run == 1 ]] && selection="test_scenario and kivi and not on_gpu"  # the emulator stands in for the GPU
  local cores shards threads i rc=0 pids=()
  cores=$(nproc)
  shards=${GPU_CHECK_TEST_SHARDS:-$((cores / 4))}
  [[ $dry_run == 1 && -z ${GPU_CHECK_TEST_SHARDS:-} ]] && shards=2  # the sharding exercised too
  ((shards < 1)) && shards=1
  ((shards > 4 && ${GPU_CHECK_TEST_SHARDS:-0} == 0)) && shards=4
  "$PYTHON" -m pytest tests/kernels --collect-only -q -p no:cacheprovider -k "$selection" > "$scratch/collect.log" 2>&1
  if ! grep '::' "$scratch/collect.log" > "$scratch/ids"; then
    cat "$scratch/collect.log"
    echo "gpu_check: no test selected"
    return 1
  fi
  local total
  total=$(wc -l < "$scratch/ids")
  ((shards > total)) && shards=$total
  threads=$((cores / shards)); ((threads < 1)) && threads=1
  echo "gpu_check: $total tests in $shards shards of $threads threads each"
  for ((i = 0; i < shards; i++)); do
    local ids=()
    mapfile -t ids < <(awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$scratch/ids")
    OMP_NUM_THREADS=$threads "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$scratch/junit.$i.xml" \
      "${ids[@]}" > "$scratch/tests.$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < shards; i++)); do
    wait "${pids[$i]}" || rc=1
    echo "===== shard $i of $shards"
    cat "$scratch/tests.$i.log"
  done
  "$PYTHON" - "$dry_run" "$total" "$scratch"/junit.*.xml <<'PY' || rc=1
import os, re, sys, xml.etree.ElementTree as ET
dry_run, total, files = sys.argv[1] == "1", int(sys.argv[2]), [f for f in sys.argv[3:] if os.path.exists(f)]
cases = [c for f in files for c in ET.parse(f).iter("testcase")]
device = [c for c in cases if dry_run or re.search(r"[\[-]cuda[\]-]|on_gpu", c.get("name", ""))]
def outcome(case):
    return next((child.tag for child in case if child.tag in ("skipped", "failure", "error")), "passed")

counts = {}
for c in device:
    counts[outcome(c)] = counts.get(outcome(c), 0) + 1
print(f"gpu_check: {len(cases)} of {total} selected tests reported; device cases: {counts}")
for c in device:
    if outcome(c) != "passed":
        print(f"  {outcome(c)}: {c.get('classname')}::{c.get('name')}")
if len(cases) != total:
    sys.exit("gpu_check: some shard did not report every test (crashed?)")
if not counts.get("passed"):
    sys.exit("gpu_check: no test ran on the GPU (are the kernel tests parametrized by kernel_cases.DEVICES?)")
PY
  return $rc
}

export -f cuda_tests
if ((build_ok != 0)); then
  blocked tests "$build_why"
elif ((wheels_ok == 1)); then
  blocked tests "no pytest"
else
  run_phase tests 220 170 "$out/tests.log" cuda_tests
fi
grep -E '^gpu_check: |passed|failed' "$out/tests.log" 2> /dev/null | tail -n 6

# ------------------------------------------------------------------------------------------
# graphs: the ops captured in CUDA graphs and replayed; a failed capture fails the phase
# ------------------------------------------------------------------------------------------
graph_check() {
  if [[ $dry_run == 1 ]]; then
    "$PYTHON" scripts/gpu_sanitize.py --graphs --emulator
  else
    "$PYTHON" scripts/gpu_sanitize.py --graphs
  fi
}

export -f graph_check
if ((build_ok != 0)); then
  blocked graphs "$build_why"
else
  run_phase graphs 60 140 "$out/graphs.log" graph_check
fi
cat "$out/graphs.log" 2> /dev/null

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
  for tool in memcheck racecheck synccheck; do blocked $tool "$build_why"; done
elif [[ $dry_run != 1 ]] && ! command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do skip_phase $tool FAILED "compute-sanitizer not found"; done
else
  run_phase memcheck 60 100 "$out/sanitize.log" sanitize memcheck window-mixed,kivi,head80-fp16,spec-decode-gqa5
  run_phase racecheck 45 70 "$out/sanitize.log" sanitize racecheck window-mixed,kivi
  run_phase synccheck 35 45 "$out/sanitize.log" sanitize synccheck window-mixed,decode-split-v1
fi
grep -E '^=====|gpu_sanitize: ok|ERROR SUMMARY' "$out/sanitize.log" 2> /dev/null

# ------------------------------------------------------------------------------------------
# bench: whatever the budget leaves, up to 100 s (its --budget-s: that minus 35 s for the
# start, the copy bandwidth and the configuration under way when the budget runs out)
# ------------------------------------------------------------------------------------------
bench() {
  if [[ $dry_run == 1 ]]; then
    "$PYTHON" -m benchmarks.kernels.cuda_decode --dry-run --out "$out" --budget-s 5
  else
    "$PYTHON" -m benchmarks.kernels.cuda_decode --require-graphs --out "$out" \
      --budget-s $((PHASE_CAP > 45 ? PHASE_CAP - 35 : 10))
  fi
}

export -f bench
if ((build_ok != 0)); then
  blocked bench "$build_why"
else
  run_phase bench 100 0 "$out/bench.log" bench
fi
[[ -f $out/bench.log ]] && grep -v '^cuda_decode: batch' "$out/bench.log" | tail -n 40

# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------
echo
echo "==================== gpu_check summary (${SECONDS}s of ${budget}s, results in $out) ===================="
summary_args=()
for name in "${phases[@]}"; do
  printf '  %-10s %-8s %5ss  %s\n' "$name" "${status[$name]}" "${seconds[$name]}" "${note[$name]:-}"
  summary_args+=("$name" "${status[$name]}" "${seconds[$name]}" "${note[$name]:-}")
done
"$PYTHON" - "$out/summary.json" "$SECONDS" "$budget" "$dry_run" "${summary_args[@]}" <<'PY'
import json, sys
path, total, budget, dry_run, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:]
phases = [{"phase": rest[i], "status": rest[i + 1], "seconds": int(rest[i + 2]), "note": rest[i + 3]}
          for i in range(0, len(rest), 4)]
failed = [p["phase"] for p in phases if p["status"] not in ("ok", "SKIPPED")]
json.dump({"seconds": total, "budget_s": budget, "dry_run": dry_run, "passed": not failed, "failed": failed,
           "phases": phases}, open(path, "w"), indent=2)
PY
if [[ $failed_phases != " " ]]; then
  echo "gpu_check: FAILED:${failed_phases% }"
  exit 1
fi
echo "gpu_check: all phases passed"
