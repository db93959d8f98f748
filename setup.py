"""Build pycompress._C, the C++ (and optionally CUDA) kernel library.

Environment switches (documented in README.md):

* ``PYCOMPRESS_ARCH``: the ``-march`` the CPU kernels are compiled for.
  Default ``native`` (tuned to the build machine). Set a portable target such
  as ``x86-64-v3`` (AVX2) or ``x86-64`` for wheels that must run elsewhere.
* ``PYCOMPRESS_CUDA``: ``auto`` (default) builds ``csrc/cuda`` only when torch
  is a CUDA build *and* a CUDA toolkit is found; ``0`` never builds it (a CUDA
  torch without a toolkit); ``1`` requires it and fails loudly otherwise.
"""

import glob
import os
import subprocess

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cpu_capability_macros(march):
    """at::vec picks its vector width from CPU_CAPABILITY_* macros, not from
    -march: without them it silently falls back to a narrow default. Ask the
    compiler which ISA the chosen -march enables and define the matching one."""
    try:
        out = subprocess.run(
            ["c++", f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    defined = {line.split()[1] for line in out.splitlines() if line.startswith("#define")}
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__"} <= defined:
        return ["-DCPU_CAPABILITY_AVX512"]
    if {"__AVX2__", "__FMA__"} <= defined:
        return ["-DCPU_CAPABILITY_AVX2"]
    return []


def _want_cuda():
    mode = os.environ.get("PYCOMPRESS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PYCOMPRESS_CUDA must be auto, 0 or 1, got {mode!r}")
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not available:
        raise SystemExit(
            "PYCOMPRESS_CUDA=1 but the CUDA build needs a CUDA build of torch "
            f"(torch.version.cuda={torch.version.cuda}) and a CUDA toolkit "
            f"(CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return mode == "1" or (mode == "auto" and available)


def extensions():
    march = os.environ.get("PYCOMPRESS_ARCH", "native")
    # -fopenmp: at::parallel_for is inlined from ATen/ParallelOpenMP.h and runs
    # serially unless _OPENMP is defined in *our* translation units. The .so
    # then needs libgomp.so.1, which resolves to the copy torch already loaded.
    cxx = ["-O3", "-std=c++17", f"-march={march}", "-fopenmp", *_cpu_capability_macros(march)]
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
                  extra_link_args=["-fopenmp"])
    if _want_cuda():
        # .cu files take raw pointers; their torch-facing bindings are the
        # csrc/cuda/*.cpp files, compiled only here because they need torch's
        # CUDA headers.
        sources += _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"]
        kwargs["define_macros"] = [("PYCOMPRESS_WITH_CUDA", "1")]
        return [cpp_extension.CUDAExtension("pycompress._C", sources, **kwargs)]
    return [cpp_extension.CppExtension("pycompress._C", sources, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
