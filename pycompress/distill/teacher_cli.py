"""Deprecated location of ``pycompress train-teacher``: see :mod:`pycompress.cli.train_teacher`."""

import warnings

from pycompress.cli.train_teacher import configure, run  # noqa: F401

warnings.warn("pycompress.distill.teacher_cli is deprecated; use pycompress.cli.train_teacher", DeprecationWarning,
              stacklevel=2)
