"""Deprecated location: block sparsity and BatchNorm folding live in :mod:`pycompress.sparsity`."""

import warnings

from pycompress.sparsity.convert import (BlockSparsifyReport, FoldedBatchNorm, FoldReport, LayerReport,  # noqa: F401
                                         block_sparsify, fold_batchnorm)

warnings.warn("pycompress.prune.block_sparse is deprecated; use pycompress.sparsity", DeprecationWarning,
              stacklevel=2)
