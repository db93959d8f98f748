"""Deprecated location of ``pycompress prune``: see :mod:`pycompress.cli.prune`.

``python -m pycompress.prune.cli`` and ``pycompress.prune.cli.main`` keep working for one release.
"""

import warnings

from pycompress.cli.prune import configure, main, run  # noqa: F401

warnings.warn("pycompress.prune.cli is deprecated; use pycompress.cli.prune", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    raise SystemExit(main())
