"""Modules that follow torch.nn conventions; each wraps a function of pycompress.functional."""

from pycompress.nn.losses import FusedLinearKDLoss, KDLoss

__all__ = ["KDLoss", "FusedLinearKDLoss"]
