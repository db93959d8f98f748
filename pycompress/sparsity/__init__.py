"""Block sparsity and BatchNorm folding (they change how a layer is stored and run, not its shape).

- :func:`block_sparsify`: converts Conv2d/Linear layers to block-sparse ones (BSR kernels).
- :func:`fold_batchnorm`: folds BatchNorm into the convs before it, for inference.
- :func:`fuse_epilogues`: moves a residual add, a ReLU or LeakyReLU and a max-pool into the
  block-sparse conv before them, for inference.
- :func:`block_sparsify_experiment`: accuracy, FLOPs and latency of block-sparse copies
  of a model against the dense one (``pycompress block-sparsify``).

Both converters work on a deep copy unless ``inplace=True``, like :func:`pycompress.prune.prune`.
"""

from pycompress.sparsity.convert import (BlockSparsifyReport, FoldedBatchNorm, FoldReport, FusedEpilogue,
                                         LayerReport, block_sparsify, fold_batchnorm, fuse_epilogues)
from pycompress.sparsity.experiment import block_sparsify_experiment, block_sparsify_from_config, format_report

__all__ = ["block_sparsify", "fold_batchnorm", "fuse_epilogues", "BlockSparsifyReport", "LayerReport",
           "FoldedBatchNorm", "FusedEpilogue", "FoldReport", "block_sparsify_experiment", "block_sparsify_from_config", "format_report"]
