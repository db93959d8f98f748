"""Fused YOLO / detection-distillation loss, Triton kernel (the CUDA backend).

Same contract as the CPU kernel (csrc/cpu/detection_loss_kernel.cpp, whose header
gives the formulas and the gradient; docs/yolo_loss.md defines the loss): per
image, the loss and ``d(loss)/d(student raw map)`` pre-divided by the reduction's
denominator.

Algorithm: one program per (image, anchor) plane and BLOCK cells. The map is
(B, A, 5 + C, H, W), so a channel's cells are contiguous: the program loads the
five box/objectness channels as BLOCK vectors and the class logits as one
(CBLOCK, BLOCK) tile, takes the softmax along the class axis in registers, and
writes the gradient once. Each program writes its partial loss to a
(B * A, cell blocks) buffer summed on the host in fp64 (deterministic, no atomics).
Memory traffic: reads student, teacher, the targets and the mask once, writes
the gradient once. Numerics: fp32 whatever the input dtype, max-shifted softmax,
int64 plane offsets.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _detection_loss_kernel(
    S, T, KEEP, ANCHORS, CLS, BOX, LABELED, PART, G,
    A, C, HW, n_blocks, gscale,
    l_distill, l_coord, l_obj, l_noobj, l_cls,
    HAS_T: tl.constexpr, HAS_KEEP: tl.constexpr, OBJ_SCALING: tl.constexpr, SUPPRESS_OBJ: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, CBLOCK: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)  # plane b * A + a
    blk = tl.program_id(1)
    b = u // A
    a = u % A
    cells = blk * BLOCK + tl.arange(0, BLOCK)
    m = cells < HW
    plane = u * (5 + C) * HW
    s_p = S + plane
    t_p = T + plane

    labeled = tl.load(LABELED + b).to(tl.int1)
    cls = tl.load(CLS + u * HW + cells, mask=m, other=-1)
    resp = tl.where(labeled & (cls >= 0), 1.0, 0.0)
    noobj = tl.where(labeled, 1.0, 0.0) - resp
    pw = tl.load(ANCHORS + 2 * a).to(tl.float32)
    ph = tl.load(ANCHORS + 2 * a + 1).to(tl.float32)

    sx = _sigmoid(tl.load(s_p + cells, mask=m, other=0.0).to(tl.float32))
    sy = _sigmoid(tl.load(s_p + HW + cells, mask=m, other=0.0).to(tl.float32))
    tw = tl.load(s_p + 2 * HW + cells, mask=m, other=0.0).to(tl.float32)
    th = tl.load(s_p + 3 * HW + cells, mask=m, other=0.0).to(tl.float32)
    o = _sigmoid(tl.load(s_p + 4 * HW + cells, mask=m, other=0.0).to(tl.float32))
    bp = BOX + u * 4 * HW
    bx = tl.load(bp + cells, mask=m, other=0.0).to(tl.float32)
    by = tl.load(bp + HW + cells, mask=m, other=0.0).to(tl.float32)
    bw = tl.load(bp + 2 * HW + cells, mask=m, other=0.0).to(tl.float32)
    bh = tl.load(bp + 3 * HW + cells, mask=m, other=0.0).to(tl.float32)

    # IoU of the decoded prediction with the ground truth (same cell, grid units), a constant.
    w1 = pw * tl.exp(tw)
    h1 = ph * tl.exp(th)
    w2 = pw * tl.exp(bw)
    h2 = ph * tl.exp(bh)
    ix = tl.maximum(tl.minimum(sx + 0.5 * w1, bx + 0.5 * w2) - tl.maximum(sx - 0.5 * w1, bx - 0.5 * w2), 0.0)
    iy = tl.maximum(tl.minimum(sy + 0.5 * h1, by + 0.5 * h2) - tl.maximum(sy - 0.5 * h1, by - 0.5 * h2), 0.0)
    inter = ix * iy
    iou = tl.where(resp > 0.0, inter / (w1 * h1 + w2 * h2 - inter), 0.0)

    ex = sx - bx
    ey = sy - by
    ew = tw - bw
    eh = th - bh
    eo = o - iou
    lane = resp * l_coord * (ex * ex + ey * ey + ew * ew + eh * eh) + resp * l_obj * eo * eo \
        + noobj * l_noobj * o * o
    gx = resp * l_coord * ex
    gy = resp * l_coord * ey
    gw = resp * l_coord * ew
    gh = resp * l_coord * eh
    go = resp * l_obj * eo + noobj * l_noobj * o

    cc = tl.arange(0, CBLOCK)[:, None]
    m2 = (cc < C) & m[None, :]
    coffs = (5 + cc) * HW + cells[None, :]
    # Padding classes are -inf; cells past the map read 0 so that no column is all -inf.
    zs = tl.where(cc < C, tl.load(s_p + coffs, mask=m2, other=0.0).to(tl.float32), float("-inf"))
    es = tl.exp(zs - tl.max(zs, axis=0)[None, :])
    p = es / tl.sum(es, axis=0)[None, :]
    p = tl.where(m2, p, 0.0)
    e = p - tl.where(cc == cls[None, :], 1.0, 0.0)
    gc = (resp * l_cls)[None, :] * e
    lane += resp * l_cls * tl.sum(tl.where(m2, e * e, 0.0), axis=0)

    if HAS_T:
        keep = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_KEEP:
            keep = tl.load(KEEP + u * HW + cells, mask=m, other=0).to(tl.float32)
        ot = _sigmoid(tl.load(t_p + 4 * HW + cells, mask=m, other=0.0).to(tl.float32))
        if HAS_KEEP and SUPPRESS_OBJ:
            ot = ot * keep
        scale = tl.full([BLOCK], 1.0, tl.float32)
        if OBJ_SCALING:
            scale = ot
        fx = sx - _sigmoid(tl.load(t_p + cells, mask=m, other=0.0).to(tl.float32))
        fy = sy - _sigmoid(tl.load(t_p + HW + cells, mask=m, other=0.0).to(tl.float32))
        fw = tw - tl.load(t_p + 2 * HW + cells, mask=m, other=0.0).to(tl.float32)
        fh = th - tl.load(t_p + 3 * HW + cells, mask=m, other=0.0).to(tl.float32)
        fo = o - ot
        dcoord = l_distill * scale * l_coord
        dcls = l_distill * scale * l_cls
        lane += l_distill * fo * fo + dcoord * (fx * fx + fy * fy + fw * fw + fh * fh)
        gx += dcoord * fx
        gy += dcoord * fy
        gw += dcoord * fw
        gh += dcoord * fh
        go += l_distill * fo
        zt = tl.where(cc < C, tl.load(t_p + coffs, mask=m2, other=0.0).to(tl.float32), float("-inf"))
        et = tl.exp(zt - tl.max(zt, axis=0)[None, :])
        pt = et / tl.sum(et, axis=0)[None, :] * keep[None, :]
        f = tl.where(m2, p - pt, 0.0)
        lane += dcls * tl.sum(f * f, axis=0)
        gc += dcls[None, :] * f

    tl.store(PART + u * n_blocks + blk, tl.sum(tl.where(m, lane, 0.0), axis=0))
    if COMPUTE_GRAD:
        k2 = 2.0 * gscale
        g_p = G + plane
        ty = G.dtype.element_ty
        tl.store(g_p + cells, (k2 * gx * sx * (1.0 - sx)).to(ty), mask=m)
        tl.store(g_p + HW + cells, (k2 * gy * sy * (1.0 - sy)).to(ty), mask=m)
        tl.store(g_p + 2 * HW + cells, (k2 * gw).to(ty), mask=m)
        tl.store(g_p + 3 * HW + cells, (k2 * gh).to(ty), mask=m)
        tl.store(g_p + 4 * HW + cells, (k2 * go * o * (1.0 - o)).to(ty), mask=m)
        dot = tl.sum(p * gc, axis=0)
        tl.store(g_p + coffs, (k2 * p * (gc - dot[None, :])).to(ty), mask=m2)


def detection_distill_loss_triton(student: torch.Tensor, teacher: Optional[torch.Tensor],
                                  keep: Optional[torch.Tensor], anchors: torch.Tensor, cls: torch.Tensor,
                                  box: torch.Tensor, labeled: torch.Tensor, objectness_scaling: bool,
                                  suppress_objectness: bool, lambda_distill: float, lambda_coord: float,
                                  lambda_obj: float, lambda_noobj: float, lambda_cls: float, reduction: str,
                                  compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``pycompress::detection_distill_loss`` op on Triton: same arguments and outputs as the CPU kernel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Annotated so that
    ``torch.library.triton_op`` can infer its schema (the ``pycompress::*_triton`` convention).
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be none, sum or mean, got {reduction!r}")
    B, A, C5, H, W = student.shape
    C, HW = C5 - 5, H * W
    has_teacher = teacher is not None
    student = student.contiguous()
    teacher = teacher.contiguous() if has_teacher else student  # a placeholder pointer when absent
    keep_t = keep.contiguous() if keep is not None else labeled  # likewise
    block = min(256, triton.next_power_of_2(max(HW, 1)))
    n_blocks = triton.cdiv(HW, block)
    part = torch.zeros((B * A, n_blocks), dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    gscale = 1.0 / B if (reduction == "mean" and B > 0) else 1.0
    if B * A and HW:
        wrap_triton(_detection_loss_kernel)[(B * A, n_blocks)](
            student, teacher, keep_t, anchors.to(torch.float32).contiguous(), cls.contiguous(),
            box.contiguous(), labeled.contiguous(), part, grad,
            A, C, HW, n_blocks, gscale,
            float(lambda_distill), float(lambda_coord), float(lambda_obj), float(lambda_noobj), float(lambda_cls),
            HAS_T=has_teacher, HAS_KEEP=keep is not None, OBJ_SCALING=bool(objectness_scaling),
            SUPPRESS_OBJ=bool(suppress_objectness), COMPUTE_GRAD=bool(compute_grad), BLOCK=block,
            CBLOCK=triton.next_power_of_2(C),
        )
    image = part.double().reshape(B, -1).sum(1)
    if reduction == "none":
        return image.to(student.dtype), grad
    return (image.sum() * gscale).to(student.dtype), grad
