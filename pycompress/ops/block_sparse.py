"""``pycompress::block_sparse_conv2d``: fake kernel, autograd and the Triton backend.

The CPU backend is C++ (csrc/cpu/block_sparse_kernel.cpp); the schema and the BSR
layout are documented in csrc/block_sparse.cpp. Backward rebuilds the masked dense
weight and uses torch's dense conv gradients, so training through the op is exact
but not sparse-accelerated; the gradient of ``values`` is that of the kept blocks.
The Triton kernel (kernels/block_sparse.py) is the op
``pycompress::block_sparse_conv2d_triton`` (``torch.library.triton_op``), also the
C++ op's CUDA kernel. Public entry points: :func:`pycompress.functional.block_sparse_conv2d`,
:class:`pycompress.nn.BlockSparseConv2d` and :class:`pycompress.nn.BlockSparseLinear`.
"""

import functools
import math

import torch
import torch.nn.functional as F

from pycompress import _extension  # has_ops(): the C++ schema must exist before registering on it

_OP = "pycompress::block_sparse_conv2d"


def conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _block_sparse_conv2d_fake(input, values, col_idx, row_ptr, bias, kernel, stride, padding, dilation,
                              out_channels, relu, residual=None, negative_slope=0.0, pool=1, out_padding=0):
    op = "pycompress::block_sparse_conv2d: "
    torch._check(input.dim() == 4, lambda: f"{op}input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(values.dim() == 3, lambda: f"{op}values must be 3-D (nnzb, bk, bo), got {values.dim()}-D")
    torch._check(input.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"{op}input must be float32, bfloat16 or float16, got {input.dtype}")
    torch._check(values.dtype == torch.float32, lambda: f"{op}values must be float32, got {values.dtype}")
    torch._check(col_idx.dim() == 1 and col_idx.shape[0] == values.shape[0],
                 lambda: f"{op}col_idx must be (nnzb,) = ({values.shape[0]},), got {tuple(col_idx.shape)}")
    torch._check(row_ptr.dim() == 1 and row_ptr.shape[0] >= 2, lambda: f"{op}row_ptr must be 1-D with >= 2 entries")
    bk, bo = values.shape[1], values.shape[2]
    rows = row_ptr.shape[0] - 1
    k = input.shape[1] * kernel[0] * kernel[1]
    torch._check(k % bk == 0, lambda: f"{op}block width bk={bk} must divide in_channels*kh*kw = {k}")
    torch._check((rows - 1) * bo < out_channels <= rows * bo,
                 lambda: f"{op}out_channels={out_channels} does not match {rows} block rows of bo={bo}")
    if bias is not None:
        torch._check(bias.shape == (out_channels,), lambda: f"{op}bias must be ({out_channels},)")
    oh = conv_out_size(input.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(input.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    torch._check(oh >= 1 and ow >= 1, lambda: f"{op}input {tuple(input.shape)} is smaller than the dilated kernel")
    check_epilogue(relu, negative_slope, pool, residual is not None, oh, ow, out_padding)
    out_shape = (input.shape[0], out_channels, oh, ow)
    if residual is not None:
        torch._check(tuple(residual.shape) == out_shape,
                     lambda: f"{op}residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
        torch._check(residual.dtype == input.dtype,
                     lambda: f"{op}residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    return padded_output_layout(out_shape[:2] + (oh // pool, ow // pool), out_padding, input, zero=False)


def padded_output_layout(shape, out_padding, like, *, zero=True):
    """An output of ``shape`` in the op's ``out_padding`` layout (csrc/block_sparse.cpp): the
    interior of planes with ``out_padding`` zero pixels on every side, then the slack the next
    conv's strips read (the C++ kernel's ``padded_layout_slack``). 0: a plain contiguous tensor.
    ``zero=False`` leaves the borders unset (fake tensors)."""
    if out_padding == 0:
        return like.new_empty(shape)
    n, c, h, w = shape
    q = out_padding
    hb, wb = h + 2 * q, w + 2 * q
    size = n * c * hb * wb + 2 * wb + 128
    buf = like.new_zeros(size) if zero else like.new_empty(size)
    return buf.as_strided(shape, (c * hb * wb, hb * wb, wb, 1), q * wb + q)


def check_epilogue(relu, negative_slope, pool, has_residual, oh, ow, out_padding=0):
    """The fused activation, pool and output layout's arguments (the same checks as the C++ kernel's)."""
    op = "pycompress::block_sparse_conv2d: "
    # The fused pool moves the activation before the max, which needs a monotone one.
    if not (math.isfinite(negative_slope) and negative_slope >= 0):
        raise ValueError(f"{op}negative_slope must be finite and >= 0, got {negative_slope}")
    if negative_slope and not relu:
        raise ValueError(f"{op}negative_slope={negative_slope} needs relu=True")
    if pool < 1:
        raise ValueError(f"{op}pool must be >= 1, got {pool}")
    if pool > 1 and has_residual:
        raise ValueError(f"{op}residual cannot be combined with pool={pool}")
    if oh < pool or ow < pool:
        raise ValueError(f"{op}the conv's output {oh}x{ow} is smaller than pool={pool}")
    if out_padding < 0:
        raise ValueError(f"{op}out_padding must be >= 0, got {out_padding}")


def block_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The block row of each stored block, (nnzb,) int64."""
    rows = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return torch.repeat_interleave(rows, row_ptr.diff())


def bsr_to_dense(values, col_idx, row_ptr, out_channels, k):
    """Dense (out_channels, k) GEMM-view weight of a BSR weight; differentiable in ``values``."""
    _, bk, bo = values.shape
    rows = row_ptr.numel() - 1
    dense = values.new_zeros(rows, k // bk, bk, bo)
    dense = dense.index_put((block_rows(row_ptr), col_idx), values)
    return dense.permute(0, 3, 1, 2).reshape(rows * bo, k)[:out_channels]


def dense_to_blocks(weight2d, bk, bo, row_idx, col_idx):
    """Gathers the (bk, bo) blocks at (row_idx, col_idx) of a dense (out, k) matrix into (nnzb, bk, bo)."""
    out, k = weight2d.shape
    rows = -(-out // bo)
    padded = weight2d.new_zeros(rows * bo, k)
    padded[:out] = weight2d
    blocks = padded.reshape(rows, bo, k // bk, bk).permute(0, 2, 3, 1)
    return blocks[row_idx, col_idx]


def _setup_context(ctx, inputs, output):
    # inputs[15:]: the Triton op's launch options, which take no gradient; inputs[14], out_padding,
    # only changes the output's layout.
    input, values, col_idx, row_ptr, bias, kernel, stride, padding, dilation, out_channels, relu = inputs[:11]
    residual, negative_slope, pool = inputs[11:14]  # torch passes every argument, defaults included
    ctx.n_inputs = len(inputs)
    # A pooled output does not say where its maxima were: backward recomputes the unpooled one.
    ctx.save_for_backward(input, values, col_idx, row_ptr, bias if pool > 1 else None,
                          output if relu and pool == 1 else None)
    ctx.conv = (list(kernel), list(stride), list(padding), list(dilation), out_channels)
    ctx.epilogue = (relu, negative_slope, pool)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _backward(ctx, grad_out):
    input, values, col_idx, row_ptr, bias, output = ctx.saved_tensors
    kernel, stride, padding, dilation, out_channels = ctx.conv
    relu, negative_slope, pool = ctx.epilogue
    if pool > 1:  # route each pooled gradient to its window's (first) maximum
        with torch.no_grad():
            output = block_sparse_conv2d_op(input)(input, values, col_idx, row_ptr, bias, kernel, stride, padding,
                                                   dilation, out_channels, relu, None, negative_slope)
        _, where = F.max_pool2d(output, pool, return_indices=True)
        grad_out = F.max_unpool2d(grad_out.to(output.dtype), where, pool, output_size=output.shape[-2:])
    if relu:  # fused ReLU / LeakyReLU (after the residual add): output > 0 exactly where its input is
        grad_out = torch.where(output > 0, grad_out, grad_out * negative_slope)
    grad_residual = grad_out if ctx.has_residual and ctx.needs_input_grad[11] else None
    # fp32 like the forward's accumulation; grad_input goes back to the input's dtype.
    in_dtype, input, grad_out = input.dtype, input.float(), grad_out.float()
    k = input.shape[1] * kernel[0] * kernel[1]
    weight = bsr_to_dense(values, col_idx, row_ptr, out_channels, k).reshape(
        out_channels, input.shape[1], kernel[0], kernel[1])
    grad_input = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.nn.grad.conv2d_input(input.shape, weight, grad_out, stride, padding, dilation).to(in_dtype)
    if ctx.needs_input_grad[1]:
        grad_w = torch.nn.grad.conv2d_weight(input, weight.shape, grad_out, stride, padding, dilation)
        grad_values = dense_to_blocks(grad_w.reshape(out_channels, k), values.shape[1], values.shape[2],
                                      block_rows(row_ptr), col_idx)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_out.sum((0, 2, 3))
    grads = (grad_input, grad_values, None, None, grad_bias) + (None,) * 6 + (grad_residual,)
    return (grads + (None,) * ctx.n_inputs)[:ctx.n_inputs]


if _extension.has_ops():
    torch.library.register_fake(_OP)(_block_sparse_conv2d_fake)
    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)

if _extension.triton_enabled():
    from pycompress.kernels.block_sparse import block_sparse_conv2d_triton

    torch.library.triton_op(_OP + "_triton", block_sparse_conv2d_triton, mutates_args=())
    torch.library.register_autograd(_OP + "_triton", _backward, setup_context=_setup_context)
    if _extension.has_ops():  # the C++ op on a CUDA tensor runs the Triton op
        torch.library.register_kernel(_OP, "cuda")(torch.ops.pycompress.block_sparse_conv2d_triton.default)


def block_sparse_conv2d_op(input: torch.Tensor):
    """The op computing the block-sparse conv on ``input``'s device: the Triton op on GPUs
    (so that ``torch.compile`` traces into its kernel), the C++ op otherwise."""
    if input.device.type != "cpu" and _extension.triton_enabled():
        return torch.ops.pycompress.block_sparse_conv2d_triton.default
    return _cpp_op()


@functools.cache
def _cpp_op():
    # Cached: the torch.ops lookup chain costs ~5 us, a quarter of a small layer's kernel.
    _extension._assert_has_ops(_OP)
    return torch.ops.pycompress.block_sparse_conv2d.default


def call_without_grad(op, *args):
    """``op(*args)`` below the autograd key, for when no gradient is wanted (grad mode off, not
    tracing). It is what register_autograd's kernel does then, without its Python frames:
    ~15 us a call, as much as the whole C++ kernel of a small layer at batch 1."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
