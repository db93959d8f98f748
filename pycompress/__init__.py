"""pycompress: kernel-accelerated model compression for PyTorch."""

from pycompress import _extension  # noqa: F401  (loads the op library before anything registers on it)
from pycompress import ops
from pycompress._extension import empty_cache
from pycompress.functional import fused_linear_kd_loss, kd_loss
from pycompress.nn import FusedLinearKDLoss, KDLoss

__all__ = ["KDLoss", "kd_loss", "FusedLinearKDLoss", "fused_linear_kd_loss", "ops", "empty_cache"]
__version__ = "0.1.0"
