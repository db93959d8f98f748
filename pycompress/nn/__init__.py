"""Modules that follow torch.nn conventions; each wraps a function of pycompress.functional."""

from pycompress.nn.block_sparse import BlockSparseConv2d, BlockSparseLinear
from pycompress.nn.losses import DetectionDistillLoss, FusedLinearKDLoss, KDLoss

__all__ = ["KDLoss", "FusedLinearKDLoss", "DetectionDistillLoss", "BlockSparseConv2d", "BlockSparseLinear"]
