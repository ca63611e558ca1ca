"""Builds the kernels as the torch extension `kvtuner_vllm._C`.

C++ CPU sources always; CUDA sources when the installed torch has CUDA and nvcc is found.
KVTUNER_BUILD_CUDA=1 forces the CUDA build, =0 skips it. Install against the torch that is
already installed: `pip install -e . --no-build-isolation`.

CUDA targets: SASS for CUDA_ARCHS plus PTX of the newest, which the driver compiles for newer
GPUs; KVTUNER_CUDA_ARCHS="90" (space or semicolon separated) builds only those (faster, e.g.
for the card at hand). KVTUNER_DEBUG_CHECKS=1 adds the kernels' device-side index checks.
"""

import os
from glob import glob

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CUDA_ARCHS = ("80", "86", "89", "90")  # scripts/compile_cuda.sh compiles the same targets


def build_cuda() -> bool:
    forced = os.environ.get("KVTUNER_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("KVTUNER_CUDA_ARCHS", "").replace(";", " ").split() or list(CUDA_ARCHS)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda arch: int(arch.rstrip("a")))  # "90a": sm_90 with its arch-specific features
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def extension():
    sources = ["csrc/torch_bindings.cpp", *sorted(glob("csrc/cpu/**/*.cpp", recursive=True))]
    define_macros = [("KVTUNER_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.abspath("csrc")]
    if not build_cuda():
        return CppExtension(
            "kvtuner_vllm._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *cuda_arch_flags()]
    if os.environ.get("KVTUNER_DEBUG_CHECKS") == "1":
        nvcc_flags.append("-DKVTUNER_DEBUG_CHECKS=1")
    return CUDAExtension(
        "kvtuner_vllm._C", sources + sorted(glob("csrc/cuda/*.cu")), include_dirs=include_dirs,
        define_macros=define_macros + [("KVTUNER_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
