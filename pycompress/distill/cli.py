"""Deprecated location of ``pycompress distill``: see :mod:`pycompress.cli.distill`."""

import warnings

from pycompress.cli.distill import configure, run  # noqa: F401

warnings.warn("pycompress.distill.cli is deprecated; use pycompress.cli.distill", DeprecationWarning, stacklevel=2)
