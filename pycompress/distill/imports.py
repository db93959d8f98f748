"""Deprecated location: the import-path loaders live in :mod:`pycompress.cli.common`."""

import warnings

from pycompress.cli.common import build_model, load_data, load_object

__all__ = ["load_object", "build_model", "load_data"]

warnings.warn("pycompress.distill.imports is deprecated; use pycompress.cli.common", DeprecationWarning,
              stacklevel=2)
