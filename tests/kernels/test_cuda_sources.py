"""Source rules of csrc/cuda that keep the CUDA build cheap and the kernels testable without a
GPU (docs/cuda-without-gpu.md): kernel bodies and kernel .cu files never include torch (they
compile in seconds, and test_cuda_emulated.py builds them with g++ alone); only launchers.cu
does, and never through <ATen/cuda/CUDAContext.h>, which does not compile without cuBLAS/cuSPARSE
headers. No CUDA file points at material outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10)/", re.MULTILINE)
LAUNCHERS = {"launchers.cu"}


def sources() -> list[Path]:
    return sorted(p for p in CUDA_DIR.rglob("*") if p.suffix in {".cu", ".cuh", ".h"})


def test_only_the_launchers_include_torch():
    offenders = [str(p.relative_to(CUDA_DIR)) for p in sources()
                 if p.name not in LAUNCHERS and TORCH_INCLUDE.search(p.read_text())]
    assert not offenders, f"torch headers outside {LAUNCHERS}: {offenders}"


def test_no_cuda_context_header():
    pattern = re.compile(r"^\s*#\s*include\s*[<\"]ATen/cuda/CUDAContext\.h", re.MULTILINE)
    assert not [p.name for p in sources() if pattern.search(p.read_text())]


def test_no_paths_outside_the_repository():
    files = sources() + [CUDA_DIR.parents[1] / "scripts" / name for name in ("compile_cuda.sh", "gpu_check.sh")]
    assert not [str(p) for p in files if "/work/" in p.read_text()]


def test_compile_script_builds_the_targets_of_setup():
    """CI's compile check (scripts/compile_cuda.sh) and the real build (setup.py) target the same GPUs."""
    repo = CUDA_DIR.parents[1]
    setup_archs = re.search(r"CUDA_ARCHS = \(([^)]*)\)", (repo / "setup.py").read_text()).group(1)
    script_archs = re.search(r"for arch in ([\d ]+); do", (repo / "scripts" / "compile_cuda.sh").read_text()).group(1)
    assert re.findall(r"\d+", setup_archs) == script_archs.split()


def test_gpu_check_script_parses():
    """scripts/gpu_check.sh only ever runs on a GPU machine: at least its syntax is checked here."""
    script = CUDA_DIR.parents[1] / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
