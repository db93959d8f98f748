"""Modules that follow torch.nn conventions; each wraps a function of pycompress.functional."""

from pycompress.nn.block_sparse import BlockSparseConv2d, BlockSparseLinear
from pycompress.nn.losses import FusedLinearKDLoss, KDLoss

__all__ = ["KDLoss", "FusedLinearKDLoss", "BlockSparseConv2d", "BlockSparseLinear"]
