"""Deprecated location: the distillation config is :class:`pycompress.config.DistillConfig`.

``load_config(path, overrides)`` and ``config_from_dict(data)`` keep working for one
release and return that same object.
"""

import warnings
from typing import Optional, Sequence

from pycompress.config import (DataConfig, DistillConfig, ModelConfig, TeacherConfig, TrainConfig, apply_overrides,
                               from_dict, read_config_file)
from pycompress.config import load_config as _load_config

__all__ = ["DistillConfig", "TrainConfig", "TeacherConfig", "ModelConfig", "DataConfig", "load_config",
           "config_from_dict", "apply_overrides", "read_config_file"]

warnings.warn("pycompress.distill.config is deprecated; use pycompress.config", DeprecationWarning, stacklevel=2)


def config_from_dict(data: dict) -> DistillConfig:
    """``DistillConfig`` from a parsed file; raises ValueError naming any unknown or ill-typed key."""
    return from_dict(DistillConfig(), data)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Reads ``path`` (if given), applies ``overrides`` and validates the result."""
    return _load_config(DistillConfig(), path, overrides)
