"""Block-sparse (BSR) 2-D convolution, Triton kernel (the CUDA backend).

Same contract as the CPU kernel (csrc/cpu/block_sparse_kernel.cpp; layout in
csrc/block_sparse.cpp): out[co, p] = sum over the nonzero (bo x bk) blocks of the
conv's GEMM view of W[co, k] * col[k, p], then bias and an optional ReLU or
LeakyReLU (the fused max-pool of the CPU kernel runs in torch after this kernel).

Algorithm: implicit GEMM. One program per (tile of BLOCK_P output pixels over
N*OH*OW, block row of bo output channels). It walks the block row's nonzero
blocks; for each it gathers the (bk, BLOCK_P) input patch straight from the NCHW
input (k = (ci, r, s) decoded in registers, padding by masked loads, no im2col
buffer) and multiplies it with the (bo, bk) block by ``tl.dot`` on tiles padded
to 16 (tensor-core shape; bo = bk = 16 needs no padding).
Memory traffic: each program reads its pixel tile's input once per nonzero block
(from L2 across block rows), every nonzero block once, writes its output tile once.
Numerics: fp32 accumulation; ``tl.dot`` on fp32 uses TF32 on tensor cores
(input_precision="tf32", ~1e-3 relative), "ieee" gives fp32 products; int64 offsets.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from pycompress.ops.block_sparse import check_epilogue, padded_output_layout


@triton.jit
def _block_sparse_conv2d_kernel(
    X, VALS, COLS, RPTR, BIAS, OUT,
    N, C, H, W, OH, OW, COUT, NEGATIVE_SLOPE,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BO_P: tl.constexpr, BK_P: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(1)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ohow = OH * OW
    p_mask = p < N * ohow
    n = p // ohow
    pix = p % ohow
    oh = pix // OW
    ow = pix % OW
    o = tl.arange(0, BO_P)
    co = row * BO + o
    o_mask = (o < BO) & (co < COUT)
    kk = tl.arange(0, BK_P)
    k_mask = kk < BK

    acc = tl.zeros([BO_P, BLOCK_P], dtype=tl.float32)
    b0 = tl.load(RPTR + row)
    b1 = tl.load(RPTR + row + 1)
    for b in range(b0, b1):
        k = tl.load(COLS + b) * BK + kk
        ci = k // (KH * KW)
        r = (k // KW) % KH
        s = k % KW
        ih = oh[None, :] * SH - PH + r[:, None] * DH
        iw = ow[None, :] * SW - PW + s[:, None] * DW
        x_mask = k_mask[:, None] & p_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(X + ((n[None, :] * C + ci[:, None]) * H + ih) * W + iw, mask=x_mask, other=0.0)
        # values[b] is stored (bk, bo): element (o, kk) at kk * BO + o. b is int64 (row_ptr is).
        w = tl.load(VALS + b * (BK * BO) + kk[None, :] * BO + o[:, None],
                    mask=(o[:, None] < BO) & k_mask[None, :], other=0.0)
        acc += tl.dot(w, x.to(tl.float32), input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + co, mask=o_mask, other=0.0)[:, None]
    if RELU:
        acc = tl.where(acc > 0, acc, acc * NEGATIVE_SLOPE)
    out_ptr = OUT + (n[None, :] * COUT + co[:, None]) * ohow + pix[None, :]
    tl.store(out_ptr, acc, mask=o_mask[:, None] & p_mask[None, :])


def block_sparse_conv2d_triton(input: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor,
                               row_ptr: torch.Tensor, bias: Optional[torch.Tensor], kernel: List[int],
                               stride: List[int], padding: List[int], dilation: List[int], out_channels: int,
                               relu: bool, residual: Optional[torch.Tensor] = None, negative_slope: float = 0.0,
                               pool: int = 1, out_padding: int = 0, block_p: int = 64,
                               input_precision: str = "tf32") -> torch.Tensor:
    """The ``pycompress::block_sparse_conv2d`` op on Triton: same arguments and output as the CPU kernel.

    The residual is added (and the activation applied after it) by torch after the kernel,
    and so is the max-pool: neither is fused here. With ``out_padding`` the result is copied
    into the padded layout, so that it matches the CPU op's; this kernel reads its input
    through masked loads and gains nothing from that layout.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    Registered as the op ``pycompress::block_sparse_conv2d_triton``
    (pycompress/ops/block_sparse.py), which ``torch.compile`` traces into.
    """
    if input.dim() != 4:
        raise ValueError(f"pycompress::block_sparse_conv2d: input must be 4-D (N, C, H, W), got {input.dim()}-D")
    if values.dim() != 3:
        raise ValueError(f"pycompress::block_sparse_conv2d: values must be 3-D (nnzb, bk, bo), got {values.dim()}-D")
    N, C, H, W = input.shape
    bk, bo = values.shape[1], values.shape[2]
    if (C * kernel[0] * kernel[1]) % bk:
        raise ValueError(f"pycompress::block_sparse_conv2d: block width bk={bk} must divide "
                         f"in_channels*kh*kw = {C * kernel[0] * kernel[1]}")
    rows = row_ptr.numel() - 1
    if not (rows - 1) * bo < out_channels <= rows * bo:
        raise ValueError(f"pycompress::block_sparse_conv2d: out_channels={out_channels} does not match {rows} "
                         f"block rows of bo={bo}")
    oh = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    check_epilogue(relu, negative_slope, pool, residual is not None, oh, ow, out_padding)
    out = torch.empty(N, out_channels, oh, ow, dtype=torch.float32, device=input.device)
    if out.numel() == 0:
        return out
    x = input.contiguous()
    vals = values.contiguous().float()
    b = bias.contiguous().float() if bias is not None else vals  # dummy pointer when HAS_BIAS=False
    grid = (triton.cdiv(N * oh * ow, block_p), rows)
    wrap_triton(_block_sparse_conv2d_kernel)[grid](
        x, vals, col_idx.contiguous(), row_ptr.contiguous(), b, out,
        N, C, H, W, oh, ow, out_channels, float(negative_slope),
        KH=kernel[0], KW=kernel[1], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1], BO=bo, BK=bk, BO_P=max(16, triton.next_power_of_2(bo)),
        BK_P=max(16, triton.next_power_of_2(bk)), BLOCK_P=block_p, HAS_BIAS=bias is not None,
        RELU=bool(relu) and residual is None, PRECISION=input_precision,
    )
    if residual is not None:
        out = out + residual.float()
        if relu:
            out = torch.nn.functional.leaky_relu(out, negative_slope)
    if pool > 1:
        out = torch.nn.functional.max_pool2d(out, pool)
    if out_padding:
        return padded_output_layout(out.shape, out_padding, input).copy_(out)
    return out.to(input.dtype)
