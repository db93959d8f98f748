"""Block-sparse Conv2d and Linear: pruned (bo x bk) blocks are skipped, not masked.

A weight is held in BSR form over its GEMM view (out, in/groups * kh * kw):
``values`` (nnzb, bk, bo) holds the kept blocks, each stored k-major (the layout
the CPU micro-kernel broadcasts from), ``col_idx`` their block columns and
``row_ptr`` the CSR offsets of each block row. All three are in the state_dict.
When ``out`` is not a multiple of bo the last block row is zero-padded; bk must
divide ``in/groups * kh * kw``.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from pycompress import functional as PF
from pycompress.ops.block_sparse import block_rows, bsr_to_dense, conv_out_size, dense_to_blocks

# Above this density the CPU kernel is no faster than oneDNN's dense conv on
# ResNet-50 shapes: at density 0.5 it still wins by 1.05-1.45x with 2 threads
# and 1.25-2.9x with 1 (bench/bench_block_sparse.py), and it does ~1/density of
# the dense work at ~50-60 % of dense's GFLOP/s. Denser layers keep a dense
# weight and call F.conv2d instead.
DEFAULT_DENSE_THRESHOLD = 0.5


def default_block_size(k: int, device: torch.device) -> Tuple[int, int]:
    """(bo, bk) for a GEMM view with k columns.

    CPU: bo = 8 output channels fill the micro-kernel's 8 accumulator rows
    (x 2-4 AVX-512 vectors of pixels); bk = 8 k-columns amortise each block's
    index load while keeping pruning fine-grained. GPU: 16 x 16 tensor-core tiles.
    bk is reduced to the largest power of two dividing k.
    """
    bo, bk = (16, 16) if device.type == "cuda" else (8, 8)
    while k % bk:
        bk //= 2
    return bo, bk


def _check_block_size(block_size, out: int, k: int, where: str) -> Tuple[int, int]:
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)):
        raise TypeError(f"{where}: block_size must be a pair of ints (bo, bk), got {block_size!r}")
    bo, bk = block_size
    if bo < 1 or bk < 1:
        raise ValueError(f"{where}: block_size (bo, bk) must be positive, got {tuple(block_size)}")
    if k % bk:
        divisors = [d for d in (1, 2, 3, 4, 8, 9, 16, 32) if k % d == 0]
        raise ValueError(f"{where}: block width bk={bk} must divide the GEMM view's {k} columns "
                         f"(in_channels/groups * kh * kw); e.g. bk in {divisors}. Output channels are "
                         f"zero-padded to a multiple of bo, columns are not.")
    return bo, bk


def bsr_from_dense(weight2d: torch.Tensor, block_size: Tuple[int, int], sparsity: Optional[float] = None,
                   block_mask: Optional[torch.Tensor] = None):
    """BSR (values, col_idx, row_ptr) of a dense (out, k) matrix, keeping the blocks of
    ``block_mask`` (R, k // bk) or, given ``sparsity``, all but the lowest-L2-norm
    ``round(sparsity * R * k / bk)`` blocks (ties: the lower flat index is pruned first)."""
    bo, bk = block_size
    out, k = weight2d.shape
    rows, kb = -(-out // bo), k // bk
    w = weight2d.detach()
    padded = w.new_zeros(rows * bo, k)
    padded[:out] = w
    blocks = padded.reshape(rows, bo, kb, bk).permute(0, 2, 3, 1)  # (R, KB, bk, bo)
    if block_mask is None:
        norms = blocks.double().pow(2).sum((2, 3)).flatten()
        order = torch.sort(norms, stable=True).indices
        keep = torch.ones(rows * kb, dtype=torch.bool, device=w.device)
        keep[order[: round(sparsity * rows * kb)]] = False
        keep = keep.reshape(rows, kb)
    else:
        keep = block_mask.to(device=w.device, dtype=torch.bool)
    row_idx, col_idx = keep.nonzero(as_tuple=True)
    values = blocks[row_idx, col_idx].contiguous().float()
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
    return values, col_idx.contiguous(), row_ptr


class _BlockSparseWeight(nn.Module):
    """BSR weight storage, state_dict handling and the dense-fallback decision."""

    def _init_bsr(self, out: int, k: int, block_size, dense_threshold: float, device=None):
        bo, bk = _check_block_size(block_size, out, k, type(self).__name__)
        if not 0.0 <= dense_threshold <= 1.0:
            raise ValueError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
        self.block_size = (bo, bk)
        self.dense_threshold = float(dense_threshold)
        self._gemm_shape = (out, k)
        rows = -(-out // bo)
        self.values = nn.Parameter(torch.zeros(0, bk, bo, device=device))
        self.register_buffer("col_idx", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("row_ptr", torch.zeros(rows + 1, dtype=torch.int64, device=device))
        self._dense_cache = None

    def _check_bsr(self, values, col_idx, row_ptr):
        """Rejects BSR arrays the kernel and :meth:`to_dense` would read differently: a row
        whose block columns are not strictly increasing (a repeated column is summed by
        the kernel but kept once by the dense export), or offsets that do not cover the blocks."""
        where = type(self).__name__
        rows = -(-self._gemm_shape[0] // self.block_size[0])
        if row_ptr.shape != (rows + 1,) or col_idx.shape != (values.shape[0],):
            raise ValueError(f"{where}: row_ptr must be ({rows + 1},) and col_idx ({values.shape[0]},) for "
                             f"{values.shape[0]} blocks, got {tuple(row_ptr.shape)} and {tuple(col_idx.shape)}")
        if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != values.shape[0] or bool((row_ptr.diff() < 0).any()):
            raise ValueError(f"{where}: row_ptr must rise from 0 to the number of blocks {values.shape[0]}, "
                             f"got {row_ptr.tolist()}")
        n_cols = self._gemm_shape[1] // self.block_size[1]
        if bool(((col_idx < 0) | (col_idx >= n_cols)).any()):
            raise ValueError(f"{where}: col_idx must lie in [0, {n_cols}), got {col_idx.tolist()}")
        row_of = block_rows(row_ptr)
        bad = (row_of[1:] == row_of[:-1]) & (col_idx[1:] <= col_idx[:-1])
        if bool(bad.any()):
            b = int(bad.nonzero()[0]) + 1
            raise ValueError(f"{where}: col_idx must be strictly increasing within each block row; row "
                             f"{int(row_of[b])} has column {int(col_idx[b - 1])} then {int(col_idx[b])}")

    def _set_bsr(self, values, col_idx, row_ptr):
        self._check_bsr(values, col_idx, row_ptr)
        self.values = nn.Parameter(values, requires_grad=self.values.requires_grad)
        self.col_idx, self.row_ptr = col_idx, row_ptr
        self._dense_cache = None

    @property
    def density(self) -> float:
        """Fraction of the (padded) GEMM view's blocks that are stored."""
        bo, bk = self.block_size
        rows = self.row_ptr.numel() - 1
        return self.values.shape[0] / (rows * (self._gemm_shape[1] // bk))

    def block_mask(self) -> torch.Tensor:
        """Bool (R, k // bk): which blocks are stored."""
        bo, bk = self.block_size
        rows = self.row_ptr.numel() - 1
        mask = torch.zeros(rows, self._gemm_shape[1] // bk, dtype=torch.bool, device=self.col_idx.device)
        mask[torch.repeat_interleave(torch.arange(rows, device=mask.device), self.row_ptr.diff()), self.col_idx] = True
        return mask

    def dense_reason(self) -> Optional[str]:
        """Why forward calls the dense kernel, or None when it runs block-sparse."""
        if getattr(self, "groups", 1) != 1:
            return f"groups={self.groups}"
        if self.density > self.dense_threshold:
            return f"density {self.density:.3f} > dense_threshold {self.dense_threshold}"
        return None

    def weight2d(self) -> torch.Tensor:
        """The masked dense GEMM-view weight (out, k); differentiable in ``values``."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            return bsr_to_dense(self.values, self.col_idx, self.row_ptr, *self._gemm_shape)
        key = (self.values.data_ptr(), self.values._version, self.col_idx.data_ptr())
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, bsr_to_dense(self.values.detach(), self.col_idx, self.row_ptr,
                                                   *self._gemm_shape))
        return self._dense_cache[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of stored blocks is data: take the shapes from the checkpoint.
        for name in ("values", "col_idx", "row_ptr"):
            src = state_dict.get(prefix + name)
            if src is None:
                continue
            cur = getattr(self, name)
            new = torch.empty(src.shape, dtype=cur.dtype, device=cur.device)
            if isinstance(cur, nn.Parameter):
                self.values = nn.Parameter(new, requires_grad=cur.requires_grad)
            else:
                setattr(self, name, new)
        self._dense_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._check_bsr(self.values, self.col_idx, self.row_ptr)

    def _bsr_repr(self) -> str:
        reason = self.dense_reason()
        kernel = "block-sparse" if reason is None else f"dense fallback ({reason})"
        return f"block_size={self.block_size}, density={self.density:.3f}, kernel={kernel}"


class BlockSparseConv2d(_BlockSparseWeight):
    r"""Conv2d whose weight is block-sparse; the CPU kernel multiplies only the kept blocks.

    Build one with :meth:`from_dense`; a freshly constructed module stores no block
    (an all-zero weight: the output is the bias), which is what ``load_state_dict``
    fills. Layers denser than ``dense_threshold``, and grouped convs, run
    ``F.conv2d`` on the masked dense weight instead; ``extra_repr`` says which.

    Args:
        in_channels, out_channels (int): as in ``nn.Conv2d``.
        kernel_size, stride, padding, dilation (int or (int, int)): as in ``nn.Conv2d``
            (zeros padding only).
        groups (int): groups > 1 always use the dense fallback.
        bias (bool): learnable bias.
        block_size ((int, int), optional): (bo, bk), bo output channels by bk columns
            of the GEMM view; default :func:`default_block_size`.
        dense_threshold (float): largest density that still runs block-sparse.
        relu (bool): apply ReLU to the output (fused into the sparse kernel); with a
            residual, after adding it.
        negative_slope (float): with ``relu``, LeakyReLU's slope below zero (0: ReLU); >= 0.
        pool (int): ``p > 1`` max-pools the activated output p x p with stride p
            (``nn.MaxPool2d(p)``), fused into the kernel's store; not with a residual.
        out_padding (int): ``q > 0`` writes the output into zero-bordered planes (a strided
            view, same values) that a following block-sparse conv of stride 1 and padding q
            reads in place; set by :func:`pycompress.sparsity.fuse_epilogues`.

    Shape:
        - input: (N, in_channels, H, W)
        - residual (optional forward argument): broadcastable to the output; of the
          output's shape and the input's dtype it is added in the kernel's store
          (:func:`pycompress.sparsity.fuse_epilogues` passes a ResNet's shortcut),
          otherwise by torch after the conv
        - output: (N, out_channels, OH // pool, OW // pool), OH and OW as ``nn.Conv2d``

    Example:
        >>> conv = nn.Conv2d(256, 256, 3, padding=1)
        >>> sparse = BlockSparseConv2d.from_dense(conv, sparsity=0.9)
        >>> y = sparse(torch.randn(1, 256, 14, 14))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, block_size: Optional[Sequence[int]] = None,
                 dense_threshold: float = DEFAULT_DENSE_THRESHOLD, relu: bool = False, negative_slope: float = 0.0,
                 pool: int = 1, out_padding: int = 0, device=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSparseConv2d: {name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"BlockSparseConv2d: in_channels={in_channels} and out_channels={out_channels} "
                             f"must be divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("BlockSparseConv2d: kernel_size, stride and dilation must be >= 1 and padding >= 0")
        self.relu = bool(relu)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"BlockSparseConv2d: pool must be a positive int, got {pool!r}")
        if not (isinstance(negative_slope, (int, float)) and math.isfinite(negative_slope) and negative_slope >= 0):
            raise ValueError(f"BlockSparseConv2d: negative_slope must be a finite float >= 0, got {negative_slope!r}")
        if isinstance(out_padding, bool) or not isinstance(out_padding, int) or out_padding < 0:
            raise ValueError(f"BlockSparseConv2d: out_padding must be an int >= 0, got {out_padding!r}")
        self.negative_slope, self.pool, self.out_padding = float(negative_slope), pool, out_padding
        k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._init_bsr(out_channels, k, block_size or default_block_size(k, device), dense_threshold, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device)) if bias else None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, sparsity: float = 0.9, block_size: Optional[Sequence[int]] = None,
                   block_mask: Optional[torch.Tensor] = None, dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
                   relu: bool = False, negative_slope: float = 0.0, pool: int = 1) -> "BlockSparseConv2d":
        """Prunes ``conv`` to block sparsity ``sparsity`` by block L2 norm, or keeps exactly the
        blocks of ``block_mask`` (bool (ceil(out / bo), in/groups*kh*kw / bk))."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"from_dense supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # 'same'
                total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in total):
                    raise ValueError("from_dense: padding='same' with an asymmetric pad is not supported")
                padding = tuple(t // 2 for t in total)
        weight = conv.weight.detach()
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                conv.groups, conv.bias is not None, block_size or default_block_size(
                    weight[0].numel(), weight.device), dense_threshold, relu, negative_slope, pool,
                device=weight.device)
        _set_from_dense(m, weight.reshape(conv.out_channels, -1), sparsity, block_mask)
        if conv.bias is not None:
            m.bias.data.copy_(conv.bias.detach())
        return m

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the masked weight (bit-exact; the fused activation and pool are not
        carried over)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=self.values.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight2d().reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"BlockSparseConv2d expects a Tensor input, got {type(input).__name__}")
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise TypeError(f"BlockSparseConv2d: residual must be a Tensor or None, got {type(residual).__name__}")
        if input.dim() != 4:
            raise ValueError(f"BlockSparseConv2d expects a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
        if input.shape[1] != self.in_channels:
            raise ValueError(f"BlockSparseConv2d expects {self.in_channels} input channels, got {input.shape[1]} "
                             f"(input shape {tuple(input.shape)})")
        # The kernel adds a residual of exactly the output's shape and dtype; torch adds any other.
        in_kernel = residual is None or (residual.shape == self._conv_out_shape(input) and residual.dtype == input.dtype
                                         and self.pool == 1)
        if self.dense_reason() is not None:
            w = self.weight2d().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            out = F.conv2d(input, w.to(input.dtype), self.bias if self.bias is None else self.bias.to(input.dtype),
                           self.stride, self.padding, self.dilation, self.groups)
        elif in_kernel:
            return PF.block_sparse_conv2d(input, self.values, self.col_idx, self.row_ptr, self.bias,
                                          self.kernel_size, self.out_channels, self.stride, self.padding,
                                          self.dilation, self.relu, residual, self.negative_slope, self.pool,
                                          self.out_padding)
        else:
            out = PF.block_sparse_conv2d(input, self.values, self.col_idx, self.row_ptr, self.bias,
                                         self.kernel_size, self.out_channels, self.stride, self.padding,
                                         self.dilation)
        if residual is not None:
            out = out + residual
        if self.relu:
            out = F.leaky_relu(out, self.negative_slope)
        return F.max_pool2d(out, self.pool) if self.pool > 1 else out

    def _conv_out_shape(self, input: torch.Tensor) -> Tuple[int, ...]:
        """The conv's (unpooled) output shape for ``input``."""
        return (input.shape[0], self.out_channels,
                *(conv_out_size(input.shape[2 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                self.dilation[i]) for i in range(2)))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.relu:
            s += ", relu=True" + (f", negative_slope={self.negative_slope}" if self.negative_slope else "")
        if self.pool > 1:
            s += f", pool={self.pool}"
        if self.out_padding:
            s += f", out_padding={self.out_padding}"
        return s + ", " + self._bsr_repr()


class BlockSparseLinear(_BlockSparseWeight):
    r"""Linear layer whose (out_features, in_features) weight is block-sparse.

    Runs the conv kernel as a 1x1 convolution over the flattened batch. Same
    storage, fallback and state_dict rules as :class:`BlockSparseConv2d`.

    Args:
        in_features, out_features (int): as in ``nn.Linear``.
        bias (bool): learnable bias.
        block_size ((int, int), optional): (bo, bk); default :func:`default_block_size`.
        dense_threshold (float): largest density that still runs block-sparse.

    Shape:
        - input: (*, in_features)
        - output: (*, out_features)

    Example:
        >>> fc = BlockSparseLinear.from_dense(nn.Linear(1024, 512), sparsity=0.9)
        >>> y = fc(torch.randn(32, 1024))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: Optional[Sequence[int]] = None, dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
                 device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSparseLinear: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._init_bsr(out_features, in_features, block_size or default_block_size(in_features, device),
                       dense_threshold, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: float = 0.9, block_size: Optional[Sequence[int]] = None,
                   block_mask: Optional[torch.Tensor] = None,
                   dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> "BlockSparseLinear":
        """Prunes ``linear`` like :meth:`BlockSparseConv2d.from_dense`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                block_size or default_block_size(linear.in_features, weight.device), dense_threshold,
                device=weight.device)
        _set_from_dense(m, weight, sparsity, block_mask)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the masked weight (bit-exact)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight2d())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"BlockSparseLinear expects a Tensor input, got {type(input).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"BlockSparseLinear expects (*, {self.in_features}) input, got shape "
                             f"{tuple(input.shape)}")
        lead = input.shape[:-1]
        rows = math.prod(lead)
        if self.dense_reason() is not None or rows == 0:  # the kernel needs at least one pixel
            bias = self.bias if self.bias is None else self.bias.to(input.dtype)
            return F.linear(input, self.weight2d().to(input.dtype), bias)
        # (rows, in) -> (1, in, rows, 1): features become channels, rows become pixels.
        x = input.reshape(rows, self.in_features).t().contiguous().view(1, self.in_features, rows, 1)
        out = PF.block_sparse_conv2d(x, self.values, self.col_idx, self.row_ptr, self.bias, 1, self.out_features)
        return out.view(self.out_features, rows).t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._bsr_repr())


def _set_from_dense(m: _BlockSparseWeight, weight2d: torch.Tensor, sparsity, block_mask):
    out, k = m._gemm_shape
    bo, bk = m.block_size
    if block_mask is None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    else:
        expected = (-(-out // bo), k // bk)
        if not isinstance(block_mask, torch.Tensor) or tuple(block_mask.shape) != expected:
            shape = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise ValueError(f"block_mask must be a bool tensor of shape {expected} (block rows, block columns), "
                             f"got {shape}")
    m._set_bsr(*bsr_from_dense(weight2d, (bo, bk), sparsity, block_mask))
