"""``pycompress::kd_loss`` and ``kd_loss_topk``: fake kernels, autograd and the Triton backend.

The CPU backend is C++ (csrc/cpu/kd_loss_kernel.cpp). The op returns the loss
and, in the same call, ``d(loss)/d(student)``; backward only scales that buffer.
The Triton kernels (kernels/kd_loss.py) are the ops ``pycompress::kd_loss_triton``
and ``kd_loss_topk_triton``, made with ``torch.library.triton_op`` so that
``torch.compile`` sees the kernels; they are also the CUDA kernels of the C++ ops.
Public entry points: :func:`pycompress.kd_loss` and :class:`pycompress.KDLoss`.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from pycompress import _extension  # has_ops(): the C++ schemas must exist before registering on them
from pycompress.kernels.reduction import is_concrete, reduction_scale

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


def _divergence(log_p, log_q, divergence, beta):
    """Row divergence between teacher log-probs ``log_p`` and student log-probs ``log_q``;
    zero-probability terms are 0 with a finite gradient (no 0 * -inf)."""
    p, q = log_p.exp(), log_q.exp()
    safe_log_p, safe_log_q = torch.where(p > 0, log_p, 0.0), torch.where(q > 0, log_q, 0.0)
    if divergence == "forward_kl":
        return (p * (safe_log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (safe_log_q - log_p)).sum(-1)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return (beta * p * (safe_log_p - log_m) + (1 - beta) * q * (safe_log_q - log_m)).sum(-1)


def differentiable_kd_loss(student, teacher, indices, target, temperature, divergence, beta, alpha, t2_scale,
                           reduction, ignore_index, tail="bucket"):
    """The loss of ``pycompress::kd_loss`` (``indices`` None) or ``kd_loss_topk`` (``teacher``
    holding the top-k values) in differentiable torch operations, accumulated in fp32 (fp64
    for fp64). Backward uses it to return a gradient with a graph when one is requested
    (``create_graph=True``): the fused kernel's gradient is a constant buffer."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(acc), teacher.to(acc)
    lead, V = s.shape[:-1], s.shape[-1]
    T = temperature
    if divergence == "mse_logits":
        row = 0.5 * ((s if indices is None else s.gather(-1, indices)) - t).pow(2).sum(-1)
    elif indices is None:
        row = _divergence(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), divergence, beta)
    elif tail == "bucket" and indices.shape[-1] < V:  # the k classes plus one tail class
        log_q = F.log_softmax(s / T, -1)
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter(-1, indices, True)
        log_q = torch.cat([log_q.gather(-1, indices), log_q.masked_fill(in_top, -float("inf")).logsumexp(-1, True)],
                          -1)
        tail_mass = (1 - t.exp().sum(-1, keepdim=True)).clamp_min(0)
        row = _divergence(F.log_softmax(torch.cat([t, tail_mass.log()], -1) / T, -1), log_q, divergence, beta)
    else:  # "drop", or k = V: both renormalised over the k classes
        row = _divergence(F.log_softmax(t / T, -1), F.log_softmax(s.gather(-1, indices) / T, -1), divergence, beta)
    row = alpha * (T * T if t2_scale and divergence != "mse_logits" else 1.0) * row
    if target is not None:
        valid = target != ignore_index
        if alpha < 1:
            ce = F.cross_entropy(s.reshape(-1, V), torch.where(valid, target, 0).reshape(-1), reduction="none")
            row = row + (1 - alpha) * ce.reshape(lead)
        row = torch.where(valid, row, 0.0)
    if reduction == "none":
        return row.to(student.dtype)
    n_rows = row.numel()
    batch = student.shape[0] if student.dim() > 1 else 1
    scale = reduction_scale(reduction, target, ignore_index, n_rows, batch, student.device)
    return (row.sum() * scale.to(acc)).to(student.dtype)


def _register_autograd(op: str, reduction_arg: int, n_args: int, topk: Optional[bool] = None):
    """Autograd for a fused loss op returning (loss, d(loss)/d(arg 0)): backward scales the
    saved gradient by the incoming one. No other argument receives a gradient. For the KD ops
    (``topk`` given) a ``create_graph=True`` backward recomputes the gradient differentiably
    (:func:`differentiable_kd_loss`), so second-order terms are not lost; other ops
    (``topk=None``) refuse it with an error naming the op."""

    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[reduction_arg]
        ctx.student_shape = inputs[0].shape
        # The options after the tensors, for the differentiable recomputation.
        if topk is None:
            ctx.save_for_backward(output[1])
        else:
            ctx.options = inputs[4 if topk else 3:-1]
            # References to the inputs, not copies: they are only read under create_graph.
            tensors = inputs[:4] if topk else (inputs[0], inputs[1], None, inputs[2])
            ctx.save_for_backward(output[1], *tensors)
        # The gradient output is a by-product, not a differentiable result. Without
        # these two lines autograd would materialise an N x V zero tensor as its
        # incoming gradient on every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_of_grad_output):
        grad = ctx.saved_tensors[0]
        if grad_loss is None:  # the loss was not used (grads are not materialised)
            return (None,) * n_args
        if torch.is_grad_enabled() and topk is None:
            raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported; its gradient is a "
                               "fused constant")
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            _, student, teacher, indices, target = ctx.saved_tensors
            temperature, divergence, beta, alpha, t2_scale, reduction, ignore_index, *tail = ctx.options
            with torch.enable_grad():
                loss = differentiable_kd_loss(student, teacher, indices, target, temperature, divergence, beta,
                                              alpha, t2_scale, reduction, ignore_index, *tail)
                (grad_student,) = torch.autograd.grad(loss, student, grad_loss, create_graph=True)
            return (grad_student,) + (None,) * (n_args - 1)
        # Without compute_grad the op returns a (0,) placeholder; a 0-row batch has a real,
        # empty gradient of the student's shape, so compare shapes, not sizes.
        if grad.shape != ctx.student_shape:
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
        _register_autograd(f"pycompress::{_name}", reduction_arg=_reduction, n_args=_n, topk=_name != "kd_loss")

if _extension.triton_enabled():
    from pycompress.kernels.kd_loss import kd_loss_topk_triton, kd_loss_triton

    torch.library.triton_op("pycompress::kd_loss_triton", kd_loss_triton, mutates_args=())
    torch.library.triton_op("pycompress::kd_loss_topk_triton", kd_loss_topk_triton, mutates_args=())
    for _name, (_reduction, _n) in _AUTOGRAD_ARGS.items():
        _register_autograd(f"pycompress::{_name}_triton", reduction_arg=_reduction, n_args=_n,
                           topk=_name != "kd_loss")
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
