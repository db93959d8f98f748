"""The pycompress:: ops: fake kernels, autograd and Triton backends, one module per op family.

Each module registers on the schemas that csrc/<family>.cpp declares (when
``pycompress._C`` is loaded) and defines the family's Triton ops; importing this
package performs every registration. The public functions live in
:mod:`pycompress.functional`.
"""

import warnings

from pycompress.ops import block_sparse as _block_sparse  # noqa: F401  (registrations only)
from pycompress.ops import detection as _detection  # noqa: F401  (registrations only)
from pycompress.ops import detection_loss as _detection_loss  # noqa: F401  (registrations only)
from pycompress.ops import fused_linear_kd as _fused_linear_kd  # noqa: F401  (registrations only)
from pycompress.ops import kd_loss as _kd_loss  # noqa: F401  (registrations only)

# Names that moved to pycompress.functional; the old paths work for one release.
_MOVED_TO_FUNCTIONAL = ("nms", "batched_nms", "fm_nms", "apply_fm_nms")


def __getattr__(name):
    if name in _MOVED_TO_FUNCTIONAL:
        warnings.warn(f"pycompress.ops.{name} moved to pycompress.functional.{name}; the old name will be "
                      "removed in the next release", DeprecationWarning, stacklevel=2)
        from pycompress import functional

        return getattr(functional, name)
    raise AttributeError(f"module 'pycompress.ops' has no attribute {name!r}")
