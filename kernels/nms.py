"""FM-NMS (Mehta & Ozturk 2018), Triton kernel (the CUDA backend of ``pycompress::fm_nms``).

Same contract as the CPU kernel (csrc/cpu/nms_kernel.cpp): per image, candidates
(anchor a at cell h, w) in objectness order, descending, ties to the lower flat
index; a candidate not yet suppressed is kept and suppresses every candidate of
its argmax class whose cell is within the K x K window (all anchors).

Algorithm: one program per (image, class); the sequential greedy pass is
replaced by rounds that give the same result:
  a round keeps every undecided candidate that ranks first among the undecided
  same-class candidates of its window, then marks as suppressed every undecided
  candidate within the window of a newly kept one.
A candidate that ranks first among its undecided neighbours has no kept
neighbour ranked above it (that one would have suppressed it), so greedy keeps
it too; and greedy suppresses exactly the lower-ranked neighbours of a kept
candidate. The best undecided candidate is kept in every round, so the loop
ends; typical maps need a few rounds, a chain of n overlapping candidates n.
Neighbour values go through two (B, N) int32 scratch rows in global memory; the
C programs of an image touch disjoint entries (one class each), and
tl.debug_barrier orders the writes and reads inside a program.
The rank (position in a stable descending sort of the objectness, NaN last: see
:func:`fm_nms_order`) and the argmax class come from torch, so ties and NaNs match the CPU op.
Memory traffic per round: 2 * A * K^2 neighbour loads of 8 bytes per candidate,
from L1/L2; the output is one bool per candidate. Integer math only.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

_UNRANKED = tl.constexpr(2**31 - 1)  # larger than any rank: "no undecided candidate here"


@triton.jit
def _same_class_neighbour(CLS, base, a2, h, w, dh, dw, H, W, c, undecided):
    """Flat index of anchor a2 at cell (h + dh, w + dw), and whether it is in the map and of class c."""
    nh = h + dh
    nw = w + dw
    j = a2 * H * W + nh * W + nw
    inb = undecided & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
    cj = tl.load(CLS + base + j, mask=inb, other=-1)
    return j, inb & (cj == c)


@triton.jit
def _fm_nms_kernel(CLS, RANK, KEY, FLAG, KEEP, A, H, W, N, RADIUS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    base = b * N
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    cls = tl.load(CLS + base + offs, mask=valid, other=-1)
    rank = tl.load(RANK + base + offs, mask=valid, other=0)
    mine = valid & (cls == c)
    hw = offs % (H * W)
    h = hw // W
    w = hw % W
    undecided = mine
    kept = tl.zeros([BLOCK], dtype=tl.int1)
    remaining = tl.sum(undecided.to(tl.int32), axis=0)
    while remaining > 0:
        # 1. Each undecided candidate publishes its rank; keep the local first ones.
        tl.store(KEY + base + offs, tl.where(undecided, rank, _UNRANKED), mask=mine)
        tl.debug_barrier()
        best = tl.full([BLOCK], _UNRANKED, tl.int32)
        for a2 in range(0, A):
            for dh in tl.static_range(-RADIUS, RADIUS + 1):
                for dw in tl.static_range(-RADIUS, RADIUS + 1):
                    j, same = _same_class_neighbour(CLS, base, a2, h, w, dh, dw, H, W, c, undecided)
                    kj = tl.load(KEY + base + j, mask=same, other=_UNRANKED)
                    best = tl.minimum(best, kj)
        new_kept = undecided & (best == rank)
        # 2. Newly kept candidates publish a flag; undecided neighbours are suppressed.
        tl.store(FLAG + base + offs, new_kept.to(tl.int32), mask=mine)
        tl.debug_barrier()
        near = tl.zeros([BLOCK], dtype=tl.int1)
        for a2 in range(0, A):
            for dh in tl.static_range(-RADIUS, RADIUS + 1):
                for dw in tl.static_range(-RADIUS, RADIUS + 1):
                    j, same = _same_class_neighbour(CLS, base, a2, h, w, dh, dw, H, W, c, undecided)
                    fj = tl.load(FLAG + base + j, mask=same, other=0)
                    near = near | (fj != 0)
        kept = kept | new_kept
        undecided = undecided & ~new_kept & ~near
        remaining = tl.sum(undecided.to(tl.int32), axis=0)
        tl.debug_barrier()  # every read of this round precedes the next round's writes
    tl.store(KEEP + base + offs, kept, mask=mine)


def fm_nms_order(objectness: torch.Tensor) -> torch.Tensor:
    """Visiting order of FM-NMS per row of (B, N) objectness: descending, ties by lower index,
    NaN last (after -inf), so a NaN cell never suppresses a real one."""
    nan = objectness.isnan()
    order = torch.where(nan, -float("inf"), objectness).sort(dim=1, descending=True, stable=True).indices
    return order.gather(1, nan.gather(1, order).to(torch.uint8).sort(dim=1, stable=True).indices)


def fm_nms_triton(objectness: torch.Tensor, class_probs: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The ``pycompress::fm_nms`` op on Triton: same arguments and output as the CPU kernel.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    Registered as the op ``pycompress::fm_nms_triton`` (pycompress/ops/detection.py),
    which ``torch.compile`` traces into. One program holds an image's A*H*W candidates, so maps up to ~64k candidates
    per image are the intended size (YOLO heads: 5 * 52 * 52 = 13520).
    """
    if objectness.dim() != 4 or class_probs.dim() != 5:
        raise ValueError(f"objectness should be (B, A, H, W) and class_probs (B, A, C, H, W), got "
                         f"{tuple(objectness.shape)} and {tuple(class_probs.shape)}")
    B, A, H, W = objectness.shape
    C = class_probs.shape[2]
    if tuple(class_probs.shape) != (B, A, C, H, W):
        raise ValueError(f"class_probs {tuple(class_probs.shape)} does not match objectness {tuple(objectness.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size should be a positive odd integer, got {kernel_size}")
    N = A * H * W
    keep = torch.zeros((B, N), dtype=torch.bool, device=objectness.device)
    if B == 0 or N == 0:
        return keep.reshape(B, A, H, W)
    dev = objectness.device
    cls = class_probs.argmax(dim=2).reshape(B, N).to(torch.int32)
    order = fm_nms_order(objectness.reshape(B, N))
    rank = torch.empty((B, N), dtype=torch.int32, device=dev)
    rank.scatter_(1, order, torch.arange(N, dtype=torch.int32, device=dev).expand(B, N).contiguous())
    key = torch.empty((B, N), dtype=torch.int32, device=dev)
    flag = torch.empty((B, N), dtype=torch.int32, device=dev)
    block = triton.next_power_of_2(N)
    wrap_triton(_fm_nms_kernel)[(B, C)](cls, rank, key, flag, keep, A, H, W, N, RADIUS=kernel_size // 2, BLOCK=block,
                           num_warps=max(4, min(32, block // 512)))
    return keep.reshape(B, A, H, W)
