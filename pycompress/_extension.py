"""Loads the compiled kernel library ``pycompress._C``.

Everything that registers fake kernels or autograd formulas for ``pycompress::``
ops imports this module first: those registrations need the op schemas, which
only exist once the library has been loaded.
"""

import importlib.machinery
import os

import torch

_BUILD_HINT = (
    "pycompress's compiled kernels (pycompress._C) could not be loaded. Build them from the "
    "source checkout with\n"
    "    pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
    "(the CPU kernels need a C++20 compiler and ninja; set PYCOMPRESS_ARCH=x86-64-v3 for a "
    "portable build, PYCOMPRESS_CUDA=0 to skip the CUDA sources). "
)


def _library_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def _load():
    path = _library_path()
    if path is None:
        return "no _C library next to pycompress/__init__.py"
    try:
        torch.ops.load_library(path)
    except OSError as exc:  # built against another torch, missing symbols, ...
        return f"loading {path} failed: {exc}"
    return None


_LOAD_ERROR = _load()


def _assert_has_ops():
    if _LOAD_ERROR is not None:
        raise RuntimeError(_BUILD_HINT + f"Cause: {_LOAD_ERROR}.")


_assert_has_ops()


def cpu_vector_bits() -> int:
    """Width of ``at::vec::Vectorized<float>`` compiled into ``_C`` (512 = AVX-512)."""
    return torch.ops.pycompress._cpu_vector_bits()


def cpu_bf16_dot() -> bool:
    """Whether ``_C`` was built with AVX512-BF16: bf16 1x1 block-sparse convs then multiply
    bf16 pairs (weights rounded to bf16, fp32 sums) instead of widening to fp32."""
    return torch.ops.pycompress._cpu_bf16_dot()


def empty_cache() -> None:
    """Returns to the system the one idle output block that large CPU outputs (the KD
    loss's gradient, block-sparse conv outputs) are recycled through."""
    torch.ops.pycompress._empty_cache()
