"""Deprecated location of ``pycompress block-sparsify``: see :mod:`pycompress.cli.block_sparsify`."""

import warnings

from pycompress.cli.block_sparsify import configure, main, run  # noqa: F401

warnings.warn("pycompress.prune.block_sparse_cli is deprecated; use pycompress.cli.block_sparsify",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    raise SystemExit(main())
