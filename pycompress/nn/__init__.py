"""Modules that follow torch.nn conventions; each wraps a function of pycompress.functional."""

from pycompress.nn.losses import KDLoss

__all__ = ["KDLoss"]
