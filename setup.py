"""Build pycompress._C, the C++ (and optionally CUDA) kernel library.

Environment switches (documented in README.md, "Build switches"):

* ``PYCOMPRESS_ARCH``: the ``-march`` the CPU kernels are compiled for.
  Default ``native`` (tuned to the build machine). Set a portable target such
  as ``x86-64-v3`` (AVX2) or ``x86-64`` for wheels that must run elsewhere.
* ``PYCOMPRESS_CUDA``: ``auto`` (default) builds ``csrc/cuda`` only when torch
  is a CUDA build *and* a CUDA toolkit is found; ``0`` never builds it (a CUDA
  torch without a toolkit); ``1`` requires it and fails loudly otherwise.
* ``CUDA_HOME``: the toolkit to build with. When unset, the first folder with
  ``bin/nvcc`` and ``include/cuda_runtime_api.h`` among ``CUDA_PATH``, the
  folder above nvcc's real path, ``/usr/local/cuda`` and ``/usr/local/cuda-*``
  (newest first).
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures. When unset, torch builds for
  the visible GPUs; with none visible (CI, a Docker build stage) this file sets
  ``DEFAULT_CUDA_ARCH_LIST``, less what the toolkit's nvcc cannot target.

The C++ standard is torch's choice: no ``-std`` is passed, so cpp_extension
adds the one its headers need (C++20 for torch 2.13 and 2.14) to the C++ and
the nvcc command lines alike.

The decisions are printed with a ``pycompress build:`` prefix (visible with
``pip install -v``).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: Turing to
# Blackwell, the architectures both CUDA 12.8+ and CUDA 13 compile for, with
# PTX of the newest so later GPUs can JIT it.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

# CUDA library headers that torch's ATen/cuda headers include (via
# ATen/cuda/CUDAContextLight.h) and that runtime-only toolkits lack.
CUDA_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


def _log(message):
    print(f"pycompress build: {message}", flush=True)


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


def is_cuda_toolkit(folder):
    """Whether folder is a CUDA toolkit torch can build with: nvcc and the runtime headers."""
    return bool(folder) and all(os.path.isfile(os.path.join(folder, *part))
                                for part in (("bin", "nvcc"), ("include", "cuda_runtime_api.h")))


def cuda_home_candidates():
    """Where a toolkit is looked for when CUDA_HOME is unset, in order. torch's own
    guess (the folder above the nvcc on PATH) is wrong when that nvcc is a symlink
    or a wrapper script such as /usr/local/bin/nvcc: realpath resolves the symlink,
    /usr/local/cuda and the versioned folders cover the wrapper."""
    nvcc = shutil.which("nvcc")
    versioned = sorted(glob.glob("/usr/local/cuda-*"),
                       key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))], reverse=True)
    return [os.environ.get("CUDA_PATH"), nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
            "/usr/local/cuda", *versioned]


def find_cuda_home():
    """The CUDA toolkit to build with, or None. An explicit CUDA_HOME must be a toolkit."""
    explicit = os.environ.get("CUDA_HOME")
    if explicit:
        if not is_cuda_toolkit(explicit):
            raise SystemExit(f"CUDA_HOME={explicit} is not a CUDA toolkit (it needs bin/nvcc and "
                             "include/cuda_runtime_api.h): point CUDA_HOME at the toolkit, or unset it")
        return explicit
    return next((c for c in cuda_home_candidates() if is_cuda_toolkit(c)), None)


def wheel_cuda_include_dirs(cuda_home):
    """Include folders of the nvidia-* wheels a CUDA torch installs, for the
    CUDA_LIBRARY_HEADERS the toolkit lacks. Passed with -idirafter, so every
    header the toolkit has still comes from the toolkit."""
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.isfile(os.path.join(cuda_home, "include", h))]
    if not missing:
        return []
    wheel_dirs = sorted({d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "include"))})
    used = [d for d in wheel_dirs if any(os.path.isfile(os.path.join(d, h)) for h in missing)]
    absent = [h for h in missing if not any(os.path.isfile(os.path.join(d, h)) for d in used)]
    if used:
        _log(f"{', '.join(missing)} not in {cuda_home}/include; using the nvidia-* wheels' {', '.join(used)}")
    if absent:
        _log(f"warning: {', '.join(absent)} found neither in {cuda_home}/include nor in an nvidia-* wheel: "
             "a binding that includes ATen/cuda/CUDAContext.h will not compile")
    return used


def nvcc_arch_numbers(cuda_home):
    """The compute capabilities ("75", "120", ...) this toolkit's nvcc can target."""
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                         check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"compute_(\d+)", out))


def default_cuda_arch_list(cuda_home):
    """DEFAULT_CUDA_ARCH_LIST less what nvcc cannot target; PTX for the newest kept."""
    supported = nvcc_arch_numbers(cuda_home)
    archs = [a.removesuffix("+PTX") for a in DEFAULT_CUDA_ARCH_LIST.split(";")]
    kept = [a for a in archs if a.replace(".", "") in supported]
    if not kept:
        raise SystemExit(f"nvcc in {cuda_home} targets none of {DEFAULT_CUDA_ARCH_LIST}: set TORCH_CUDA_ARCH_LIST")
    return ";".join(kept[:-1] + [kept[-1] + "+PTX"])


def choose_cuda_arch_list(cuda_home):
    """Sets TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible: torch's
    cpp_extension would otherwise query device 0 and fail with IndexError."""
    import torch

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    gpus = torch.cuda.device_count()
    if arch_list and arch_list != "native":
        _log(f"TORCH_CUDA_ARCH_LIST={arch_list} (from the environment)")
    elif gpus:
        _log(f"TORCH_CUDA_ARCH_LIST unset or native: building for the {gpus} visible GPU(s)")
    elif arch_list == "native":
        raise SystemExit("TORCH_CUDA_ARCH_LIST=native needs a visible GPU: unset it to build for "
                         f"{DEFAULT_CUDA_ARCH_LIST}, or list the architectures")
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(cuda_home)
        _log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: using TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']}")


def cuda_build_home():
    """The toolkit for the csrc/cuda build, or None to build the CPU kernels only."""
    mode = os.environ.get("PYCOMPRESS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PYCOMPRESS_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _log("PYCOMPRESS_CUDA=0: CPU kernels only")
        return None
    import torch

    # A CPU torch never looks for a toolkit: a stale CUDA_HOME must not break its build.
    cuda_home = find_cuda_home() if torch.version.cuda is not None else None
    if cuda_home is not None:
        _log(f"CUDA build with the toolkit in {cuda_home} (torch {torch.__version__}, CUDA {torch.version.cuda})")
        return cuda_home
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        looked_in = ", ".join(c for c in cuda_home_candidates() if c)
        reason = f"no CUDA toolkit found (looked in {looked_in}): set CUDA_HOME to one"
    if mode == "1":
        raise SystemExit(f"PYCOMPRESS_CUDA=1 but {reason}")
    _log(f"CPU kernels only: {reason}")
    return None


def extensions():
    march = os.environ.get("PYCOMPRESS_ARCH", "native")
    # -fopenmp: at::parallel_for is inlined from ATen/ParallelOpenMP.h and runs
    # serially unless _OPENMP is defined in *our* translation units. The .so
    # then needs libgomp.so.1, which resolves to the copy torch already loaded.
    cxx = ["-O3", f"-march={march}", "-fopenmp", *_cpu_capability_macros(march)]
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
                  extra_link_args=["-fopenmp"])
    cuda_home = cuda_build_home()
    if cuda_home is None:
        return [cpp_extension.CppExtension("pycompress._C", sources, **kwargs)]
    # cpp_extension reads the toolkit from its module-level CUDA_HOME.
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    choose_cuda_arch_list(cuda_home)
    for folder in wheel_cuda_include_dirs(cuda_home):
        cxx += ["-idirafter", folder]
    # .cu files take raw pointers; their torch-facing bindings are the
    # csrc/cuda/*.cpp files, compiled only here because they need torch's
    # CUDA headers.
    sources += _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
    kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
    kwargs["define_macros"] = [("PYCOMPRESS_WITH_CUDA", "1")]
    return [cpp_extension.CUDAExtension("pycompress._C", sources, **kwargs)]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
