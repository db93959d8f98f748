"""``pycompress::detection_distill_loss``: fake kernel, autograd and the CUDA (Triton) backend.

The CPU backend is C++ (csrc/cpu/detection_loss_kernel.cpp). The op returns the
per-image or reduced loss and, in the same call, ``d(loss)/d(student raw map)``;
backward only scales that buffer. Public entry points:
:func:`pycompress.functional.detection_distill_loss` and
:class:`pycompress.nn.DetectionDistillLoss`.
"""

import torch

from pycompress import _extension  # has_ops(): the C++ schema must exist before registering on it
from pycompress.ops.kd_loss import _register_autograd

_OP = "pycompress::detection_distill_loss"


def _detection_distill_loss_fake(student, teacher, keep, anchors, cls, box, labeled, objectness_scaling,
                                 suppress_objectness, lambda_distill, lambda_coord, lambda_obj, lambda_noobj,
                                 lambda_cls, reduction, compute_grad):
    torch._check(student.dim() == 5 and student.shape[2] >= 6,
                 lambda: f"{_OP}: student must be (B, A, 5 + C, H, W) with C >= 1, got {tuple(student.shape)}")
    B, A, _, H, W = student.shape
    if teacher is not None:
        torch._check(teacher.shape == student.shape,
                     lambda: f"{_OP}: teacher {tuple(teacher.shape)} must have the student's shape "
                             f"{tuple(student.shape)}")
        torch._check(teacher.dtype == student.dtype,
                     lambda: f"{_OP}: teacher ({teacher.dtype}) must have the student's dtype ({student.dtype})")
    if keep is not None:
        torch._check(teacher is not None, lambda: f"{_OP}: keep (the teacher's FM-NMS mask) needs a teacher")
        torch._check(tuple(keep.shape) == (B, A, H, W), lambda: f"{_OP}: keep {tuple(keep.shape)} must be (B, A, H, W)")
    torch._check(tuple(anchors.shape) == (A, 2), lambda: f"{_OP}: anchors {tuple(anchors.shape)} must be ({A}, 2)")
    torch._check(tuple(cls.shape) == (B, A, H, W), lambda: f"{_OP}: cls {tuple(cls.shape)} must be (B, A, H, W)")
    torch._check(cls.dtype == torch.int64, lambda: f"{_OP}: cls must be int64, got {cls.dtype}")
    torch._check(tuple(box.shape) == (B, A, 4, H, W), lambda: f"{_OP}: box {tuple(box.shape)} must be (B, A, 4, H, W)")
    torch._check(tuple(labeled.shape) == (B,), lambda: f"{_OP}: labeled {tuple(labeled.shape)} must be ({B},)")
    torch._check(labeled.dtype == torch.bool, lambda: f"{_OP}: labeled must be bool, got {labeled.dtype}")
    torch._check(reduction in ("none", "sum", "mean"),
                 lambda: f"{_OP}: reduction must be one of none, sum, mean, got {reduction!r}")
    loss = student.new_empty((B,) if reduction == "none" else ())
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return loss, grad


def _detection_distill_loss_cuda(*args):
    # Triton is imported on first GPU use only: CPU users never pay for it.
    from pycompress.kernels.detection_loss import detection_distill_loss_triton

    return detection_distill_loss_triton(*args)


if _extension.has_ops():  # without the compiled library `import pycompress` still works (README)
    torch.library.register_fake(_OP)(_detection_distill_loss_fake)
    _register_autograd(_OP, reduction_arg=14, n_args=16)
    torch.library.register_kernel(_OP, "cuda")(_detection_distill_loss_cuda)
