"""The pycompress:: ops: fake kernels, autograd and GPU backends, one module per op family.

Each module registers on the schemas that csrc/<family>.cpp declares; importing
this package performs every registration.
"""

from pycompress.ops import block_sparse as _block_sparse  # noqa: F401  (registrations only)
from pycompress.ops import detection_loss as _detection_loss  # noqa: F401  (registrations only)
from pycompress.ops import fused_linear_kd as _fused_linear_kd  # noqa: F401  (registrations only)
from pycompress.ops import kd_loss as _kd_loss  # noqa: F401  (registrations only)
from pycompress.ops.nms import nms, batched_nms, fm_nms, apply_fm_nms  # noqa: F401
