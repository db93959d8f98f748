"""Modules that follow torch.nn conventions; each wraps a function of pycompress.functional."""

from pycompress.nn.block_sparse import BlockSparseConv2d, BlockSparseLinear
from pycompress.nn.losses import KDLoss

__all__ = ["BlockSparseConv2d", "BlockSparseLinear", "KDLoss"]
