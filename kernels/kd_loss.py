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
Numerics: fp32 accumulation whatever the input dtype, int64 row offsets,
max-shifted exponentials, log-probabilities taken from logits.
"""

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, JSD, MSE_LOGITS = 0, 1, 2, 3
_DIVERGENCES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD, "mse_logits": MSE_LOGITS}


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

    tgt = -1
    valid = True
    if HAS_TARGET:
        tgt = tl.load(TGT + row)
        valid = tgt != ignore_index
    if not valid:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + cols0
                tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty), mask=cols < V)
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
                sm = tl.where(mask, s, neg_inf)
                m_new = tl.maximum(m1, tl.max(sm))
                z1 = z1 * tl.exp(m1 - m_new) + tl.sum(tl.exp(sm - m_new))
                m1 = m_new
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

    # Pass 1: online maxima and sums.
    ms = tl.full([], neg_inf, tl.float32)
    mt = tl.full([], neg_inf, tl.float32)
    zs = tl.zeros([], tl.float32)
    zt = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
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
        rs = tl.exp(ms - ms_new)
        rt = tl.exp(mt - mt_new)
        es = tl.exp(x - ms_new)
        et = tl.exp(y - mt_new)
        zs = zs * rs + tl.sum(es)
        zt = zt * rt + tl.sum(et)
        diff = tl.where(mask, x - y, 0.0)
        if DIV == 0:
            a = a * rt - tl.sum(et * diff)
        if DIV == 1:
            a = a * rs + tl.sum(es * diff)
        if NEED_CE and not T_IS_ONE:
            sm = tl.where(mask, s, neg_inf)
            m1_new = tl.maximum(m1, tl.max(sm))
            z1 = z1 * tl.exp(m1 - m1_new) + tl.sum(tl.exp(sm - m1_new))
            m1 = m1_new
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(zs)
    lse_t = mt + tl.log(zt)
    lse1 = lse_s
    if NEED_CE and not T_IS_ONE:
        lse1 = m1 + tl.log(z1)

    div = tl.zeros([], tl.float32)
    if DIV == 0:
        div = a / zt + lse_s - lse_t
    if DIV == 1:
        div = a / zs + lse_t - lse_s
    kl_qm = tl.zeros([], tl.float32)
    if DIV == 2:  # Pass 2: JSD's log-mixture terms; 0 log 0 = 0.
        for off in range(0, V, BLOCK):
            cols = off + cols0
            mask = cols < V
            log_q = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            log_p = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.where(mask, tl.exp(log_q), 0.0)
            p = tl.where(mask, tl.exp(log_p), 0.0)
            log_m = tl.log(beta * p + (1.0 - beta) * q)
            tq = tl.where(q > 0.0, q * (log_q - log_m), 0.0)
            tp = tl.where(p > 0.0, p * (log_p - log_m), 0.0)
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
                log_m = tl.log(beta * tl.exp(log_p) + (1.0 - beta) * q)
                r = tl.where(q > 0.0, log_q - log_m, 0.0)
                g = gsoft * (1.0 - beta) * q * (r - kl_qm)
            if NEED_CE:
                g += hard_coef * (tl.exp(s - lse1) - tl.where(cols == tgt, 1.0, 0.0))
            tl.store(g_row + cols, (g * gscale).to(G.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def kd_loss_triton(student, teacher, target, temperature, divergence, beta, alpha, t2_scale, reduction,
                   ignore_index, compute_grad):
    """The ``pycompress::kd_loss`` op on Triton: same arguments and outputs as the CPU kernel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}")
    if reduction not in ("none", "sum", "mean", "batchmean"):
        raise ValueError(f"reduction must be none, sum, mean or batchmean, got {reduction!r}")
    V = student.shape[-1]
    s2, t2 = _rows(student), _rows(teacher)
    N = s2.shape[0]
    mse = divergence == "mse_logits"
    T = 1.0 if mse else float(temperature)
    scale = T * T if (t2_scale and not mse) else 1.0
    need_ce = alpha < 1.0
    has_target = target is not None
    tgt = target.reshape(-1).to(torch.int64) if has_target else s2.new_empty(0, dtype=torch.int64)

    # The reduction's denominator, as a device scalar (no host sync).
    n_valid = (tgt != ignore_index).sum() if has_target else torch.tensor(N, device=student.device)
    n_valid = n_valid.to(torch.float64)
    if reduction == "mean":
        denom = n_valid
    elif reduction == "batchmean":
        denom = n_valid * (student.shape[0] / N) if N else n_valid
    else:
        denom = torch.ones((), dtype=torch.float64, device=student.device)
    gscale = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-300), 0.0).to(torch.float32).reshape(1)

    loss_rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad \
        else student.new_empty(0)
    if N:
        block = min(4096, triton.next_power_of_2(V))
        _kd_loss_kernel[(N,)](
            s2, t2, tgt, loss_rows, grad, gscale,
            s2.stride(0), t2.stride(0), V,
            1.0 / T, alpha * scale, 1.0 - alpha, float(beta), int(ignore_index),
            DIV=_DIVERGENCES[divergence], HAS_TARGET=has_target, NEED_CE=need_ce and has_target,
            T_IS_ONE=T == 1.0, COMPUTE_GRAD=compute_grad, BLOCK=block,
        )
    if reduction == "none":
        loss = loss_rows.to(student.dtype).reshape(student.shape[:-1])
    else:
        loss = (loss_rows.double().sum() * gscale.double().squeeze(0)).to(student.dtype)
    return loss, grad
