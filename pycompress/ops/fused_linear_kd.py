"""``pycompress::fused_linear_kd_loss``: the KD loss of ``hidden @ weight.T`` logits, never materialised.

Algorithm: the rows are processed in chunks of C. Per chunk,
  1. student logits = h_c @ W_s.T (+ b_s), teacher logits likewise (or a slice of
     the given dense or top-k teacher): BLAS on CPU, cuBLAS on GPU, into buffers
     reused across chunks;
  2. the fused KD op (``pycompress::kd_loss`` / ``kd_loss_topk``) returns the chunk's
     summed loss and d(loss)/d(logits) in one pass over the logits;
  3. grad_h[c] = g @ W_s, grad_W_s += g.T @ h_c, grad_b_s += sum(g): accumulated here,
     in the forward, so backward only scales them (as the KD op does for logits).
reduction="none" returns per-row losses, so the gradients depend on the incoming
per-row grad_output: the forward computes losses only, and backward runs the
chunks again with each row's gradient scaled by its grad_output (the logits
GEMMs twice, the same memory).
Memory: O(C x V) for three logits-sized chunk buffers plus the parameter-sized
gradients, never O(N x V). C is picked so the chunk buffers stay near 128 MiB.
Numerics: the chunk losses are summed in fp64 and divided once by the global
denominator of the reduction (the same contract as ``kd_loss``); weight and bias
gradients accumulate in fp32 (fp64 for fp64 inputs).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from pycompress.kernels.reduction import reduction_scale
from pycompress.ops.kd_loss import _is_concrete_one, differentiable_kd_loss, kd_loss_op  # also registers the ops

_OP = "pycompress::fused_linear_kd_loss"
CHUNK_BUDGET_BYTES = 128 << 20


def auto_chunk_size(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk such that three (chunk, V) buffers take about CHUNK_BUDGET_BYTES;
    a multiple of 64 rows (GEMM-friendly) when the budget allows it."""
    rows = max(1, CHUNK_BUDGET_BYTES // (3 * vocab * element_size))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(n_rows, rows))


def fused_linear_kd(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                    teacher_logits, topk_values, topk_indices, target, temperature, divergence, beta, alpha, t2_scale,
                    reduction, ignore_index, topk_tail, chunk_size, compute_grad, row_weights=None, kd_impl=None,
                    kd_topk_impl=None):
    """The chunked computation; returns ``(loss, grad_hidden, grad_weight, grad_bias)``.

    ``reduction="none"`` gives per-row losses (shape ``student_hidden.shape[:-1]``) and
    no gradients. ``row_weights`` (N,) scales each row's gradient (reduction "sum"):
    the backward of "none". ``kd_impl`` / ``kd_topk_impl`` replace the per-chunk ops
    (tests run the Triton kernel through here under the interpreter); by default they
    dispatch on device.
    """
    kd_impl = kd_impl or kd_loss_op(student_hidden)
    kd_topk_impl = kd_topk_impl or kd_loss_op(student_hidden, topk=True)
    batch = student_hidden.shape[0] if student_hidden.dim() > 1 else 1
    N, V = math.prod(student_hidden.shape[:-1]), student_weight.shape[0]
    h_s = student_hidden.reshape(N, student_hidden.shape[-1])  # N, not -1: H may be 0
    h_t = teacher_hidden.reshape(N, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    t_dense = teacher_logits.reshape(-1, V) if teacher_logits is not None else None
    tv = topk_values.reshape(N, -1) if topk_values is not None else None
    ti = topk_indices.reshape(N, -1) if topk_indices is not None else None
    y = target.reshape(-1) if target is not None else None
    C = chunk_size if chunk_size > 0 else auto_chunk_size(N, V, h_s.element_size())

    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(h_s) if compute_grad else h_s.new_empty(0)
    grad_w = h_s.new_zeros(student_weight.shape, dtype=acc) if compute_grad else h_s.new_empty(0)
    grad_b = h_s.new_zeros(V, dtype=acc) if (compute_grad and student_bias is not None) else h_s.new_empty(0)
    s_buf = h_s.new_empty(min(C, N), V)
    t_buf = h_s.new_empty(min(C, N), V) if h_t is not None else None
    per_row = reduction == "none"
    total = h_s.new_zeros(N if per_row else (), dtype=torch.float64)
    for start in range(0, N, C):
        end = min(N, start + C)
        logits = s_buf[: end - start]
        torch.matmul(h_s[start:end], student_weight.t(), out=logits)
        if student_bias is not None:
            logits += student_bias
        y_c = y[start:end] if y is not None else None
        args = (temperature, divergence, beta, alpha, t2_scale, "none" if per_row else "sum", ignore_index)
        if tv is not None:
            loss_c, g = kd_topk_impl(logits, tv[start:end], ti[start:end], y_c, *args, topk_tail, compute_grad)
        else:
            if h_t is not None:
                t_logits = t_buf[: end - start]
                torch.matmul(h_t[start:end], teacher_weight.t(), out=t_logits)
                if teacher_bias is not None:
                    t_logits += teacher_bias
            else:
                t_logits = t_dense[start:end]
            loss_c, g = kd_impl(logits, t_logits, y_c, *args, compute_grad)
        if per_row:
            total[start:end] = loss_c
        else:
            total += loss_c.double()
        if compute_grad:
            if row_weights is not None:
                g.mul_(row_weights[start:end, None].to(g.dtype))
            torch.matmul(g, student_weight, out=grad_h[start:end])
            grad_w.addmm_(g.t().to(acc), h_s[start:end].to(acc))
            if student_bias is not None:
                grad_b += g.sum(0, dtype=acc)
    if per_row:
        return total.to(h_s.dtype).reshape(student_hidden.shape[:-1]), grad_h, grad_w, grad_b
    scale = reduction_scale(reduction, y, ignore_index, N, batch, h_s.device)
    loss = (total * scale).to(h_s.dtype)
    if compute_grad:
        grad_h.mul_(scale.to(grad_h.dtype))
        grad_h = grad_h.reshape(student_hidden.shape)
        grad_w = grad_w.mul_(scale).to(student_weight.dtype)
        if student_bias is not None:
            grad_b = grad_b.mul_(scale).to(student_bias.dtype)
    return loss, grad_h, grad_w, grad_b


@torch.library.custom_op(_OP, mutates_args=(), device_types=("cpu", "cuda"))
def fused_linear_kd_loss_op(
        student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
        teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
        teacher_bias: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
        topk_values: Optional[torch.Tensor], topk_indices: Optional[torch.Tensor], target: Optional[torch.Tensor],
        temperature: float, divergence: str, beta: float, alpha: float, t2_scale: bool, reduction: str,
        ignore_index: int, topk_tail: str, chunk_size: int, compute_grad: bool,
        row_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias); the gradients are empty unless compute_grad."""
    return fused_linear_kd(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias, teacher_logits, topk_values, topk_indices, target, temperature, divergence,
                           beta, alpha, t2_scale, reduction, ignore_index, topk_tail, chunk_size, compute_grad,
                           row_weights)


@fused_linear_kd_loss_op.register_fake
def _fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
          topk_values, topk_indices, target, temperature, divergence, beta, alpha, t2_scale, reduction, ignore_index,
          topk_tail, chunk_size, compute_grad, row_weights=None):
    torch._check(student_hidden.shape[-1] == student_weight.shape[-1],
                 lambda: "pycompress::fused_linear_kd_loss: student_hidden and student_weight disagree on H")
    loss = student_hidden.new_empty(student_hidden.shape[:-1] if reduction == "none" else ())
    if not compute_grad:  # three distinct empty tensors, as the real kernel returns
        return loss, student_hidden.new_empty(0), student_hidden.new_empty(0), student_hidden.new_empty(0)
    grad_b = torch.empty_like(student_bias) if student_bias is not None else student_hidden.new_empty(0)
    return loss, torch.empty_like(student_hidden), torch.empty_like(student_weight), grad_b


_N_TENSOR_INPUTS = 10  # student_hidden ... target; then the options, compute_grad and row_weights


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.hidden_shape = inputs[0].shape
    # temperature, divergence, beta, alpha, t2_scale, reduction, ignore_index, topk_tail, chunk_size
    ctx.options = inputs[_N_TENSOR_INPUTS:-2]
    ctx.per_row = ctx.options[5] == "none"
    # The inputs (references, no copies): "none" runs the chunks again in backward, and
    # create_graph=True recomputes the loss differentiably. Otherwise the forward's gradients.
    ctx.save_for_backward(*inputs[:_N_TENSOR_INPUTS], *(() if ctx.per_row else output[1:]))
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    grads: List[Optional[torch.Tensor]] = [None] * 21
    if grad_loss is None:
        return tuple(grads)
    inputs = ctx.saved_tensors[:_N_TENSOR_INPUTS]
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return _differentiable_grads(ctx, inputs, grad_loss, grads)
    if ctx.per_row:
        temperature, divergence, beta, alpha, t2_scale, _, ignore_index, topk_tail, chunk_size = ctx.options
        _, grad_h, grad_w, grad_b = fused_linear_kd_loss_op(
            *inputs, temperature, divergence, beta, alpha, t2_scale, "sum", ignore_index, topk_tail,
            chunk_size, True, grad_loss.reshape(-1))
        grads[0], grads[1] = grad_h, grad_w
        if ctx.has_bias:
            grads[2] = grad_b
        return tuple(grads)
    grad_h, grad_w, grad_b = ctx.saved_tensors[_N_TENSOR_INPUTS:]
    if grad_h.shape != ctx.hidden_shape:  # the (0,) placeholder, not a 0-row batch's empty gradient
        raise RuntimeError("pycompress::fused_linear_kd_loss was called with compute_grad=False; use "
                           "pycompress.FusedLinearKDLoss, which asks for gradients when they are needed")
    one = _is_concrete_one(grad_loss)
    grads[0] = grad_h if one else grad_h * grad_loss
    grads[1] = grad_w if one else grad_w * grad_loss
    if ctx.has_bias:
        grads[2] = grad_b if one else grad_b * grad_loss
    return tuple(grads)


def _differentiable_grads(ctx, inputs, grad_loss, grads):
    """The gradients of the loss recomputed with torch ops (logits materialised) so that
    autograd can differentiate them again; O(N x V) memory, like the unfused loss."""
    h, w, b, t_hidden, t_weight, t_bias, t_logits, topk_values, topk_indices, target = inputs
    temperature, divergence, beta, alpha, t2_scale, reduction, ignore_index, topk_tail, _ = ctx.options
    wanted = [(i, x) for i, x in enumerate((h, w, b)) if x is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        logits = F.linear(h, w, b)
        if topk_values is not None:
            teacher = topk_values
        elif t_hidden is not None:
            teacher = F.linear(t_hidden, t_weight, t_bias)
        else:
            teacher = t_logits
        loss = differentiable_kd_loss(logits, teacher, topk_indices, target, temperature, divergence, beta, alpha,
                                      t2_scale, reduction, ignore_index, topk_tail)
        found = torch.autograd.grad(loss, [x for _, x in wanted], grad_loss, create_graph=True)
    for (i, _), g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


fused_linear_kd_loss_op.register_autograd(_backward, setup_context=_setup_context)
