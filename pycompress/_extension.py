"""Loads the compiled kernel library ``pycompress._C``, without ever failing the import.

``import pycompress`` works without ``_C`` (not built, or built against another
torch): the pure-Python parts (the fx dependency graph, the Trainer, config
parsing, the CLI) need no kernels. Each op wrapper calls :func:`_assert_has_ops`
with its op's name before its first use of the op, as torchvision does, and that
raises the build hint. The fake kernels and autograd formulas of the C++ ops
register only when :func:`has_ops` is true: they need the op schemas, which only
exist once the library has been loaded.
"""

import importlib.machinery
import os

import torch

_BUILD_HINT = (
    "pycompress's compiled kernels (pycompress._C) could not be loaded, so {op} is unavailable. Build them "
    "from the source checkout with\n"
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


def has_ops() -> bool:
    """Whether ``pycompress._C`` is loaded, so that the ``pycompress::`` C++ ops exist."""
    return _LOAD_ERROR is None


def _assert_has_ops(op: str = "the pycompress:: ops") -> None:
    """Raises RuntimeError with the build command when ``_C`` is not loaded; ``op`` names
    the op the caller needs."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_BUILD_HINT.format(op=op) + f"Cause: {_LOAD_ERROR}.")


def cpu_vector_bits() -> int:
    """Width of ``at::vec::Vectorized<float>`` compiled into ``_C`` (512 = AVX-512)."""
    _assert_has_ops("pycompress::_cpu_vector_bits")
    return torch.ops.pycompress._cpu_vector_bits()


def cpu_bf16_dot() -> bool:
    """Whether ``_C`` was built with AVX512-BF16: bf16 1x1 block-sparse convs then multiply
    bf16 pairs (weights rounded to bf16, fp32 sums) instead of widening to fp32."""
    _assert_has_ops("pycompress::_cpu_bf16_dot")
    return torch.ops.pycompress._cpu_bf16_dot()


def empty_cache() -> None:
    """Returns to the system the idle output blocks that large CPU outputs are recycled
    through: the KD loss's last gradient and the block-sparse convs' idle outputs (up to
    256 MiB). A no-op without ``_C``."""
    if has_ops():
        torch.ops.pycompress._empty_cache()


def triton_enabled() -> bool:
    """Whether the Triton backends register (importing triton): on a GPU build with a GPU,
    or under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, the tests). CPU users
    never import triton."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
