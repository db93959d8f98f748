"""``pycompress::kd_loss`` and ``kd_loss_topk``: fake kernels, autograd and the Triton backend.

The CPU backend is C++ (csrc/cpu/kd_loss_kernel.cpp). The op returns the loss
and, in the same call, ``d(loss)/d(student)``; backward only scales that buffer.
The Triton kernels (kernels/kd_loss.py) are the ops ``pycompress::kd_loss_triton``
and ``kd_loss_topk_triton``, made with ``torch.library.triton_op`` so that
``torch.compile`` sees the kernels; they are also the CUDA kernels of the C++ ops.
Public entry points: :func:`pycompress.kd_loss` and :class:`pycompress.KDLoss`.
"""

import torch

from pycompress import _extension  # has_ops(): the C++ schemas must exist before registering on them
from pycompress.kernels.reduction import is_concrete, reduction_scale  # noqa: F401  (reduction_scale's old home)

_OP = "pycompress::kd_loss"
_TOPK_OP = "pycompress::kd_loss_topk"


def _kd_loss_fake(student, teacher, target, temperature, divergence, beta, alpha, t2_scale, reduction,
                  ignore_index, compute_grad):
    torch._check(student.dim() >= 1, lambda: "pycompress::kd_loss: student must have at least 1 dim")
    torch._check(student.shape == teacher.shape,
                 lambda: f"pycompress::kd_loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must have the same shape")
    torch._check(student.dtype == teacher.dtype,
                 lambda: f"pycompress::kd_loss: student ({student.dtype}) and teacher ({teacher.dtype}) "
                         "must share a dtype")
    if target is not None:
        torch._check(target.shape == student.shape[:-1],
                     lambda: f"pycompress::kd_loss: target {tuple(target.shape)} must have the student's "
                             f"leading shape {tuple(student.shape[:-1])}")
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else ())
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return loss, grad


def _is_concrete_one(x):
    """True when x is a real tensor equal to 1. Traced values (dynamo, fake or
    functorch-wrapped tensors) cannot be inspected, so they report False."""
    return is_concrete(x) and bool(x == 1)


def _register_autograd(op: str, reduction_arg: int, n_args: int):
    """Autograd for a fused loss op returning (loss, d(loss)/d(arg 0)): backward scales the
    saved gradient by the incoming one. No other argument receives a gradient."""

    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[reduction_arg]
        ctx.save_for_backward(output[1])
        # The gradient output is a by-product, not a differentiable result. Without
        # these two lines autograd would materialise an N x V zero tensor as its
        # incoming gradient on every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_of_grad_output):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:  # the loss was not used (grads are not materialised)
            return (None,) * n_args
        if grad.numel() == 0 and grad_loss.numel() != 0:
            raise RuntimeError(f"{op} was called with compute_grad=False; call it with compute_grad=True to "
                               "differentiate it (the public functions do this)")
        if ctx.reduction == "none":  # one loss per leading index (row, image): broadcast over the rest
            grad_student = grad * grad_loss.reshape(grad_loss.shape + (1,) * (grad.dim() - grad_loss.dim()))
        elif _is_concrete_one(grad_loss):
            grad_student = grad  # loss.backward(): the forward's buffer is the gradient, no copy
        else:
            grad_student = grad * grad_loss
        return (grad_student,) + (None,) * (n_args - 1)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _kd_loss_topk_fake(student, teacher_values, teacher_indices, target, temperature, divergence, beta, alpha,
                       t2_scale, reduction, ignore_index, tail, compute_grad):
    torch._check(student.dim() >= 1, lambda: "pycompress::kd_loss_topk: student must have at least 1 dim")
    torch._check(teacher_values.shape[:-1] == student.shape[:-1],
                 lambda: f"pycompress::kd_loss_topk: teacher values {tuple(teacher_values.shape)} must be "
                         f"({tuple(student.shape[:-1])}, k)")
    torch._check(teacher_indices.shape == teacher_values.shape,
                 lambda: "pycompress::kd_loss_topk: teacher indices must match the values' shape")
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else ())
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return loss, grad


# Argument positions of the two schemas: (reduction, number of arguments).
_AUTOGRAD_ARGS = {"kd_loss": (8, 11), "kd_loss_topk": (9, 13)}

if _extension.has_ops():
    torch.library.register_fake(_OP)(_kd_loss_fake)
    torch.library.register_fake(_TOPK_OP)(_kd_loss_topk_fake)
    for _name, (_reduction, _n) in _AUTOGRAD_ARGS.items():
        _register_autograd(f"pycompress::{_name}", reduction_arg=_reduction, n_args=_n)

if _extension.triton_enabled():
    from pycompress.kernels.kd_loss import kd_loss_topk_triton, kd_loss_triton

    torch.library.triton_op("pycompress::kd_loss_triton", kd_loss_triton, mutates_args=())
    torch.library.triton_op("pycompress::kd_loss_topk_triton", kd_loss_topk_triton, mutates_args=())
    for _name, (_reduction, _n) in _AUTOGRAD_ARGS.items():
        _register_autograd(f"pycompress::{_name}_triton", reduction_arg=_reduction, n_args=_n)
        if _extension.has_ops():  # the C++ op on a CUDA tensor runs the Triton op
            torch.library.register_kernel(f"pycompress::{_name}", "cuda")(
                getattr(torch.ops.pycompress, f"{_name}_triton").default)


def kd_loss_op(student: torch.Tensor, topk: bool = False):
    """The op computing the KD loss of ``student``'s device: the Triton op on GPUs (so that
    ``torch.compile`` traces into its kernel), the C++ op otherwise."""
    name = "kd_loss_topk" if topk else "kd_loss"
    if student.device.type != "cpu" and _extension.triton_enabled():
        return getattr(torch.ops.pycompress, f"{name}_triton")
    _extension._assert_has_ops(f"pycompress::{name}")
    return getattr(torch.ops.pycompress, name)
