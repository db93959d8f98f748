"""Fused temperature-softmax knowledge-distillation loss, Triton kernel (the CUDA backend).

Same contract as the CPU kernel (csrc/cpu/kd_loss_kernel.cpp, whose header gives
the formulas): per row, the loss ``alpha * scale * D(P, Q) + (1 - alpha) * CE`` and
``d(loss)/d(student)`` pre-divided by the reduction's denominator.

Algorithm: one program per row, looping over the V logits in BLOCK-wide tiles.
  pass 1  online softmax: running max and rescaled sums of exp for the student
          (at 1/T and, for CE at T != 1, at T = 1) and the teacher, plus the
          KL cross term sum P (y - x) (forward) or sum Q (x - y) (reverse),
          rescaled whenever the running max moves;
  pass 2  JSD only: the log-mixture terms, which need normalised P and Q;
  pass 3  the gradient, recomputing exps (cheaper on a GPU than a scratch row).
Memory traffic: reads student and teacher once from DRAM per pass (L2 holds a
row on large GPUs), writes the gradient once; nothing else of size N x V.
Numerics: fp32 accumulation whatever the input dtype (tile sums are tree reductions;
the row's scalars are combined in fp64), int64 row offsets,
max-shifted exponentials, log-probabilities taken from logits.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from pycompress.kernels.reduction import is_concrete, reduction_scale

FORWARD_KL, REVERSE_KL, JSD, MSE_LOGITS = 0, 1, 2, 3
_DIVERGENCES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD, "mse_logits": MSE_LOGITS}


@triton.jit
def _online_lse_step(m, z, vals):
    """One tile of an online log-sum-exp: the running max m and sum z of exp(. - m)."""
    m_new = tl.maximum(m, tl.max(vals))
    return m_new, z * tl.exp(m - m_new) + tl.sum(tl.exp(vals - m_new))


@triton.jit
def _log_m_over_q(log_pq, beta):
    """log(M/Q) = log(beta P/Q + 1 - beta) for the JSD mixture M, from u = log(P/Q), without
    overflow where Q underflows (u large): max(u, 0) is taken out before exponentiating."""
    top = tl.maximum(log_pq, 0.0)
    return top + tl.log(beta * tl.exp(log_pq - top) + (1.0 - beta) * tl.exp(-top))


@triton.jit
def _row_target(TGT, row, ignore_index, HAS_TARGET: tl.constexpr):
    """The row's target class (-1 without targets) and whether the row counts."""
    tgt = -1
    valid = True
    if HAS_TARGET:
        tgt = tl.load(TGT + row)
        valid = tgt != ignore_index
    return tgt, valid


@triton.jit
def _store_zero_row(LOSS, g_row, row, V, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    tl.store(LOSS + row, 0.0)
    if COMPUTE_GRAD:
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _kd_loss_kernel(
    S, T, TGT, LOSS, G, GSCALE,
    stride_s, stride_t, V,
    inv_t, soft_coef, hard_coef, beta, ignore_index,
    DIV: tl.constexpr, HAS_TARGET: tl.constexpr, NEED_CE: tl.constexpr, T_IS_ONE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = G + row * V
    cols0 = tl.arange(0, BLOCK)

    tgt, valid = _row_target(TGT, row, ignore_index, HAS_TARGET)
    if not valid:  # an ignored row: no loss, zero gradient
        _store_zero_row(LOSS, g_row, row, V, COMPUTE_GRAD, BLOCK)
        return
    gscale = tl.load(GSCALE)
    neg_inf = float("-inf")

    if DIV == 3:  # mse_logits: 1/2 ||s - t||^2 and, for CE, lse(s)
        sq = tl.zeros([], tl.float32)
        m1 = tl.full([], neg_inf, tl.float32)
        z1 = tl.zeros([], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            sq += tl.sum(0.5 * (s - t) * (s - t))
            if NEED_CE:
                m1, z1 = _online_lse_step(m1, z1, tl.where(mask, s, neg_inf))
        loss = soft_coef * sq
        lse1 = m1 + tl.log(z1)
        if NEED_CE:
            loss += hard_coef * (lse1 - tl.load(s_row + tgt).to(tl.float32))
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = soft_coef * (s - t)
                if NEED_CE:
                    g += hard_coef * (tl.exp(s - lse1) - tl.where(cols == tgt, 1.0, 0.0))
                tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=mask)
        return

    # Pass 1: online maxima and sums. The running sums are fp64 scalars: each rescale of an
    # fp32 sum costs an ulp, and at high T a few ulps of zs are the divergence's own size.
    ms = tl.full([], neg_inf, tl.float32)
    mt = tl.full([], neg_inf, tl.float32)
    zs = tl.zeros([], tl.float64)
    zt = tl.zeros([], tl.float64)
    a = tl.zeros([], tl.float64)
    m1 = tl.full([], neg_inf, tl.float32)
    z1 = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + cols0
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * inv_t, neg_inf)
        y = tl.where(mask, tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t, neg_inf)
        ms_new = tl.maximum(ms, tl.max(x))
        mt_new = tl.maximum(mt, tl.max(y))
        rs = tl.exp((ms - ms_new).to(tl.float64))
        rt = tl.exp((mt - mt_new).to(tl.float64))
        es = tl.exp(x - ms_new)
        et = tl.exp(y - mt_new)
        zs = zs * rs + tl.sum(es).to(tl.float64)
        zt = zt * rt + tl.sum(et).to(tl.float64)
        diff = tl.where(mask, x - y, 0.0)
        if DIV == 0:
            a = a * rt - tl.sum(et * diff).to(tl.float64)
        if DIV == 1:
            a = a * rs + tl.sum(es * diff).to(tl.float64)
        if NEED_CE and not T_IS_ONE:
            m1, z1 = _online_lse_step(m1, z1, tl.where(mask, s, neg_inf))
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(zs).to(tl.float32)
    lse_t = mt + tl.log(zt).to(tl.float32)
    lse1 = lse_s
    if NEED_CE and not T_IS_ONE:
        lse1 = m1 + tl.log(z1)

    # At high T the divergence is a small difference of two log-sums of about log(V):
    # the row's scalars are combined in fp64, and JSD's logs are taken of P/Q (from the
    # logits' difference), never as differences of separately rounded log-probabilities.
    lse_gap = (mt - ms).to(tl.float64) + tl.log(zt) - tl.log(zs)
    div = tl.zeros([], tl.float32)
    if DIV == 0:
        div = (a / zt - lse_gap).to(tl.float32)
    if DIV == 1:
        div = (a / zs + lse_gap).to(tl.float32)
    lse_gap = lse_gap.to(tl.float32)
    kl_qm = tl.zeros([], tl.float32)
    if DIV == 2:  # Pass 2: JSD's log-mixture terms; 0 log 0 = 0.
        for off in range(0, V, BLOCK):
            cols = off + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.where(mask, tl.exp(s * inv_t - lse_s), 0.0)
            p = tl.where(mask, tl.exp(t * inv_t - lse_t), 0.0)
            log_pq = (t - s) * inv_t - lse_gap  # log(P/Q)
            log_mq = _log_m_over_q(log_pq, beta)
            tq = tl.where(q > 0.0, -q * log_mq, 0.0)
            tp = tl.where(p > 0.0, p * (log_pq - log_mq), 0.0)
            div += tl.sum(beta * tp + (1.0 - beta) * tq)
            kl_qm += tl.sum(tq)

    loss = soft_coef * div
    if NEED_CE:
        loss += hard_coef * (lse1 - tl.load(s_row + tgt).to(tl.float32))
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:  # Pass 3: the gradient.
        gsoft = soft_coef * inv_t
        for off in range(0, V, BLOCK):
            cols = off + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_q = s * inv_t - lse_s
            log_p = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.exp(log_q)
            if DIV == 0:
                g = gsoft * (q - tl.exp(log_p))
            elif DIV == 1:
                g = gsoft * q * (log_q - log_p - div)
            else:
                log_pq = (tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - s) * inv_t - lse_gap
                r = tl.where(q > 0.0, -_log_m_over_q(log_pq, beta), 0.0)  # log(Q/M)
                g = gsoft * (1.0 - beta) * q * (r - kl_qm)
            if NEED_CE:
                g += hard_coef * (tl.exp(s - lse1) - tl.where(cols == tgt, 1.0, 0.0))
            tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=mask)


class _Launch(NamedTuple):
    """Host-side state of one kernel launch, shared by the dense and top-k wrappers."""
    T: float                 # the temperature (1 for logit regression)
    soft_coef: float         # alpha * (T^2 when t2_scale, else 1)
    has_target: bool
    tgt: torch.Tensor        # int64 targets, flattened (empty without)
    gscale: torch.Tensor     # 1 / the reduction's denominator, a device scalar
    loss_rows: torch.Tensor  # fp32 per-row losses, written by the kernel
    grad: torch.Tensor       # the student's gradient (empty unless compute_grad)


def _launch_state(student, target, N, temperature, divergence, alpha, t2_scale, reduction, ignore_index,
                  compute_grad) -> _Launch:
    mse = divergence == "mse_logits"
    T = 1.0 if mse else float(temperature)
    has_target = target is not None
    tgt = target.reshape(-1).to(torch.int64) if has_target else student.new_empty(0, dtype=torch.int64)
    gscale = reduction_scale(reduction, tgt if has_target else None, ignore_index, N,
                             student.shape[0] if student.dim() > 1 else 1, student.device)
    gscale = gscale.to(torch.float32).reshape(1)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad \
        else student.new_empty(0)
    return _Launch(T, alpha * (T * T if (t2_scale and not mse) else 1.0), has_target, tgt, gscale,
                   torch.empty(N, dtype=torch.float32, device=student.device), grad)


def _reduced(L: _Launch, reduction, student):
    """(loss, grad) as the op returns them; the reduced loss is summed in fp64."""
    if reduction == "none":
        return L.loss_rows.to(student.dtype).reshape(student.shape[:-1]), L.grad
    return (L.loss_rows.double().sum() * L.gscale.double().squeeze(0)).to(student.dtype), L.grad


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def kd_loss_triton(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                   temperature: float, divergence: str, beta: float, alpha: float, t2_scale: bool, reduction: str,
                   ignore_index: int, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``pycompress::kd_loss`` op on Triton: same arguments and outputs as the CPU kernel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    Registered as the op ``pycompress::kd_loss_triton`` (pycompress/ops/kd_loss.py),
    which ``torch.compile`` traces into: only torch ops and ``wrap_triton`` launches here.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}")
    if reduction not in ("none", "sum", "mean", "batchmean"):
        raise ValueError(f"reduction must be none, sum, mean or batchmean, got {reduction!r}")
    V = student.shape[-1]
    s2, t2 = _rows(student), _rows(teacher)
    N = s2.shape[0]
    L = _launch_state(student, target, N, temperature, divergence, alpha, t2_scale, reduction, ignore_index,
                      compute_grad)
    if N:
        wrap_triton(_kd_loss_kernel)[(N,)](
            s2, t2, L.tgt, L.loss_rows, L.grad, L.gscale,
            s2.stride(0), t2.stride(0), V,
            1.0 / L.T, L.soft_coef, 1.0 - alpha, float(beta), int(ignore_index),
            DIV=_DIVERGENCES[divergence], HAS_TARGET=L.has_target, NEED_CE=alpha < 1.0 and L.has_target,
            T_IS_ONE=L.T == 1.0, COMPUTE_GRAD=compute_grad, BLOCK=min(4096, triton.next_power_of_2(V)),
        )
    return _reduced(L, reduction, student)


@triton.jit
def _kd_loss_topk_kernel(
    S, TV, TI, TGT, LOSS, G, GSCALE,
    stride_s, V, K,
    inv_t, soft_coef, hard_coef, beta, ignore_index,
    DIV: tl.constexpr, BUCKET: tl.constexpr, HAS_TARGET: tl.constexpr, NEED_CE: tl.constexpr,
    T_IS_ONE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    """Sparse-teacher KD loss for one row (semantics: csrc/cpu/kd_loss_kernel.cpp, kd_topk_row).

    A column's bucket is found by comparing the tile's column ids with the k teacher
    indices (a BLOCK x KBLOCK match), so each pass stays one sweep over the row.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    g_row = G + row * V
    cols0 = tl.arange(0, BLOCK)
    kk = tl.arange(0, KBLOCK)
    kmask = kk < K
    neg_inf = float("-inf")

    tgt, valid = _row_target(TGT, row, ignore_index, HAS_TARGET)
    if not valid:  # an ignored row: no loss, zero gradient
        _store_zero_row(LOSS, g_row, row, V, COMPUTE_GRAD, BLOCK)
        return
    gscale = tl.load(GSCALE)
    v = tl.load(TV + row * K + kk, mask=kmask, other=0.0).to(tl.float32)
    idx = tl.load(TI + row * K + kk, mask=kmask, other=-1)
    s_top = tl.load(s_row + idx, mask=kmask, other=0.0).to(tl.float32)

    # Student pass: tempered max and sum, the tail's sum, and lse(s) for CE.
    m = tl.full([], neg_inf, tl.float32)
    z = tl.zeros([], tl.float32)
    zt = tl.zeros([], tl.float32)
    m1 = tl.full([], neg_inf, tl.float32)
    z1 = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + cols0
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * inv_t, neg_inf)
        in_top = tl.sum(tl.where(cols[:, None] == idx[None, :], 1, 0), 1) > 0
        m_new = tl.maximum(m, tl.max(x))
        r = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        z = z * r + tl.sum(e)
        zt = zt * r + tl.sum(tl.where(in_top, 0.0, e))
        m = m_new
        if NEED_CE and not T_IS_ONE:
            m1, z1 = _online_lse_step(m1, z1, tl.where(mask, s, neg_inf))
    lse = m + tl.log(z)
    lse1 = lse
    if NEED_CE and not T_IS_ONE:
        lse1 = m1 + tl.log(z1)

    div = tl.zeros([], tl.float32)
    lq_tail = tl.zeros([], tl.float32)
    lp_tail = tl.zeros([], tl.float32)
    h_tail = tl.zeros([], tl.float32)
    if DIV == 3:  # mse_logits on the k given logits
        d = tl.where(kmask, s_top - v, 0.0)
        div = tl.sum(0.5 * d * d)
        h = d
        q = tl.zeros([KBLOCK], tl.float32)
        lp = tl.zeros([KBLOCK], tl.float32)
    else:
        u = tl.where(kmask, v * inv_t, neg_inf)
        if BUCKET:
            tail_mass = tl.maximum(1.0 - tl.sum(tl.where(kmask, tl.exp(v), 0.0)), 0.0)
            u_tail = tl.log(tail_mass) * inv_t
            umax = tl.maximum(tl.max(u), u_tail)
            tlse = umax + tl.log(tl.sum(tl.exp(u - umax)) + tl.exp(u_tail - umax))
            lp_tail = u_tail - tlse
            lq = s_top * inv_t - lse
            lq_tail = tl.log(zt) - tl.log(z)
        else:
            umax = tl.max(u)
            tlse = umax + tl.log(tl.sum(tl.exp(u - umax)))
            xq = tl.where(kmask, s_top * inv_t, neg_inf)
            qmax = tl.max(xq)
            lq = xq - (qmax + tl.log(tl.sum(tl.exp(xq - qmax))))
        lp = u - tlse
        p = tl.where(kmask, tl.exp(lp), 0.0)
        q = tl.where(kmask, tl.exp(lq), 0.0)
        if DIV == 0:
            div = tl.sum(tl.where(p > 0.0, p * (lp - lq), 0.0))
            h = tl.zeros([KBLOCK], tl.float32)
        elif DIV == 1:
            div = tl.sum(tl.where(q > 0.0, q * (lq - lp), 0.0))
        else:
            lm = tl.log(beta * p + (1.0 - beta) * q)
            tq = tl.where(q > 0.0, q * (lq - lm), 0.0)
            div = tl.sum(beta * tl.where(p > 0.0, p * (lp - lm), 0.0) + (1.0 - beta) * tq)
            kl_qm = tl.sum(tq)
        if BUCKET:
            p_t = tl.exp(lp_tail)
            q_t = tl.exp(lq_tail)
            if DIV == 0:
                div += tl.where(p_t > 0.0, p_t * (lp_tail - lq_tail), 0.0)
            elif DIV == 1:
                div += tl.where(q_t > 0.0, q_t * (lq_tail - lp_tail), 0.0)
            else:
                lm_t = tl.log(beta * p_t + (1.0 - beta) * q_t)
                tq_t = tl.where(q_t > 0.0, q_t * (lq_tail - lm_t), 0.0)
                div += beta * tl.where(p_t > 0.0, p_t * (lp_tail - lm_t), 0.0) + (1.0 - beta) * tq_t
                kl_qm += tq_t
        # h: d(divergence)/d(x_j) = q_j h_b for reverse KL and JSD.
        if DIV == 1:
            h = lq - lp - div
            if BUCKET:
                h_tail = lq_tail - lp_tail - div
        if DIV == 2:
            h = (1.0 - beta) * (tl.where(q > 0.0, lq - lm, 0.0) - kl_qm)
            if BUCKET:
                h_tail = (1.0 - beta) * (tl.where(q_t > 0.0, lq_tail - lm_t, 0.0) - kl_qm)

    loss = soft_coef * div
    if NEED_CE:
        loss += hard_coef * (lse1 - tl.load(s_row + tgt).to(tl.float32))
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        gsoft = soft_coef * inv_t
        if DIV == 3:
            gsoft = soft_coef
        # the soft gradient of a top-k class, per slot
        if DIV == 0:
            g_top = q - p
        elif DIV == 3:
            g_top = h
        else:
            g_top = q * h
        c_tail = 0.0
        if BUCKET and DIV != 3:
            if DIV == 0:
                c_tail = tl.where(zt > 0.0, 1.0 / z - tl.exp(lp_tail) / zt, 0.0)
            else:
                c_tail = tl.where(zt > 0.0, h_tail / z, 0.0)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            match = cols[:, None] == idx[None, :]
            in_top = tl.sum(tl.where(match, 1, 0), 1) > 0
            top_val = tl.sum(tl.where(match, g_top[None, :], 0.0), 1)
            g = gsoft * tl.where(in_top, top_val, c_tail * tl.exp(s * inv_t - m))
            if NEED_CE:
                g += hard_coef * (tl.exp(s - lse1) - tl.where(cols == tgt, 1.0, 0.0))
            tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=mask)


def kd_loss_topk_triton(student: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                        target: Optional[torch.Tensor], temperature: float, divergence: str, beta: float, alpha: float,
                        t2_scale: bool, reduction: str, ignore_index: int, tail: str,
                        compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``pycompress::kd_loss_topk`` op on Triton; same arguments and outputs as the CPU kernel."""
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}")
    if tail not in ("bucket", "drop"):
        raise ValueError(f"tail must be 'bucket' or 'drop', got {tail!r}")
    V = student.shape[-1]
    s2 = _rows(student)
    N, k = s2.shape[0], teacher_values.shape[-1]
    tv = teacher_values.reshape(N, k).to(torch.float32).contiguous()
    ti = teacher_indices.reshape(N, k).to(torch.int64).contiguous()
    if N and is_concrete(ti):
        # A kernel cannot raise: check what the CPU kernel checks row by row, here at once
        # (on real tensors only: a traced graph cannot branch on the data).
        if bool((ti < 0).any() | (ti >= V).any()):
            raise ValueError(f"teacher indices must be in [0, {V}); got values outside")
        if k > 1 and bool((ti.sort(-1).values.diff(dim=-1) == 0).any()):
            raise ValueError("teacher indices must not repeat within a row")
        if tail == "bucket" and divergence != "mse_logits" and k < V and bool((tv.exp().sum(-1) > 1.001).any()):
            raise ValueError("with tail='bucket' the teacher values must be log-probabilities (log_softmax at T = 1)")
    L = _launch_state(student, target, N, temperature, divergence, alpha, t2_scale, reduction, ignore_index,
                      compute_grad)
    if N:
        wrap_triton(_kd_loss_topk_kernel)[(N,)](
            s2, tv, ti, L.tgt, L.loss_rows, L.grad, L.gscale, s2.stride(0), V, k,
            1.0 / L.T, L.soft_coef, 1.0 - alpha, float(beta), int(ignore_index),
            DIV=_DIVERGENCES[divergence], BUCKET=(tail == "bucket" and k < V), HAS_TARGET=L.has_target,
            NEED_CE=alpha < 1.0 and L.has_target, T_IS_ONE=L.T == 1.0, COMPUTE_GRAD=compute_grad,
            BLOCK=min(1024, triton.next_power_of_2(V)), KBLOCK=triton.next_power_of_2(k),
        )
    return _reduced(L, reduction, student)
