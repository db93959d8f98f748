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


def reduction_scale(reduction: str, target, ignore_index: int, n_rows: int, batch: int, device) -> torch.Tensor:
    """1 / the reduction's denominator over all rows, as a float64 device scalar (no host sync).

    The contract of :func:`pycompress.kd_loss` (the CPU kernel's ``setup_loss``): ``none``
    and ``sum`` divide by 1, ``mean`` by the valid rows, ``batchmean`` by
    ``n_valid * batch / n_rows``; 0 when no row is valid. Shared by the Triton backend
    and the fused linear loss, which reduce on the host side of their kernels.
    """
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=torch.float64, device=device)
    n_valid = (target != ignore_index).sum() if target is not None else torch.tensor(n_rows, device=device)
    denom = n_valid.to(torch.float64)
    if reduction == "batchmean" and n_rows:
        denom = denom * (batch / n_rows)
    return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-300), 0.0)


def _is_concrete_one(x):
    """True when x is a real tensor equal to 1. Traced values (dynamo, fake or
    functorch-wrapped tensors) cannot be inspected, so they report False."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return bool(x == 1)


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


_register_autograd(_OP, reduction_arg=8, n_args=11)


@torch.library.register_fake("pycompress::kd_loss_topk")
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


_register_autograd("pycompress::kd_loss_topk", reduction_arg=9, n_args=13)


@torch.library.register_kernel(_OP, "cuda")
def _kd_loss_cuda(*args):
    # Triton is imported on first GPU use only: CPU users never pay for it.
    from pycompress.kernels.kd_loss import kd_loss_triton

    return kd_loss_triton(*args)



@torch.library.register_kernel("pycompress::kd_loss_topk", "cuda")
def _kd_loss_topk_cuda(*args):
    from pycompress.kernels.kd_loss import kd_loss_topk_triton

    return kd_loss_topk_triton(*args)
