"""Test-wide set-up.

Without a GPU, Triton kernels run under Triton's CPU interpreter. The variable
must be set before triton is first imported, which is why it happens here, at
collection time, before any test module imports a kernel.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return request.param
