"""``pycompress::kd_loss``: fake kernel, autograd and the CUDA (Triton) backend.

The CPU backend is C++ (csrc/cpu/kd_loss_kernel.cpp). The op returns the loss
and, in the same call, ``d(loss)/d(student)``; backward only scales that buffer.
Public entry points: :func:`pycompress.kd_loss` and :class:`pycompress.KDLoss`.
"""

import torch

from pycompress import _extension  # noqa: F401  (the schema must exist before registering on it)

_OP = "pycompress::kd_loss"


@torch.library.register_fake(_OP)
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


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.save_for_backward(output[1])
    # The gradient output is a by-product, not a differentiable result. Without
    # these two lines autograd would materialise an N x V zero tensor as its
    # incoming gradient on every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _is_concrete_one(x):
    """True when x is a real tensor equal to 1. Traced values (dynamo, fake or
    functorch-wrapped tensors) cannot be inspected, so they report False."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return bool(x == 1)


def _backward(ctx, grad_loss, _grad_of_grad_output):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None,) * 11
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("pycompress::kd_loss was called with compute_grad=False; call it with "
                           "compute_grad=True to differentiate it (pycompress.kd_loss does this)")
    if ctx.reduction == "none":
        grad_student = grad * grad_loss.unsqueeze(-1)
    elif _is_concrete_one(grad_loss):
        grad_student = grad  # loss.backward(): the forward's buffer is the gradient, no copy
    else:
        grad_student = grad * grad_loss
    # The teacher never receives a gradient; nor do the non-tensor arguments.
    return (grad_student,) + (None,) * 10


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


@torch.library.register_kernel(_OP, "cuda")
def _kd_loss_cuda(*args):
    # Triton is imported on first GPU use only: CPU users never pay for it.
    from pycompress.kernels.kd_loss import kd_loss_triton

    return kd_loss_triton(*args)

