"""Build of the ``crossbar_torch._C`` extension (the compiled custom ops).

CPU kernels always; CUDA kernels when ``torch.cuda.is_available()`` or ``FORCE_CUDA=1``
(a CPU-only build never calls nvcc). ``MAX_JOBS`` caps ninja's parallelism as usual.
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _sources(pattern):
    return sorted(glob.glob(os.path.join(CSRC, pattern)))


def get_extensions():
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = (torch.cuda.is_available() and CUDA_HOME is not None) or force_cuda
    sources = _sources("*.cpp") + _sources(os.path.join("cpu", "*.cpp"))
    # at::parallel_for runs on OpenMP in the Linux wheels of torch.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -ffp-contract=off: no product is fused into a multiply-add, so the CPU kernels round as
    # the references do (docs/semantics.md; xb_mul in csrc/common.h) whatever the target ISA
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off"] + openmp
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    extension = CppExtension
    if use_cuda:
        if force_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extension = CUDAExtension
        sources += _sources(os.path.join("cuda", "*.cu"))
        define_macros.append(("WITH_CUDA", None))
        # nvcc has no -g0 (it emits no device debug info unless -G / -g): pass it to the host
        # compiler.
        extra_compile_args["nvcc"] = ["-O3", "-Xcompiler=-g0"]
    return [
        extension(
            "crossbar_torch._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=openmp,
        )
    ]


# Name, version, dependencies and packages live in pyproject.toml.
setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
