"""Loading user code and data by import path (``package.module:callable``)."""

import importlib
from typing import Any, Optional, Tuple

from torch import nn
from torch.utils.data import Dataset

__all__ = ["load_object", "build_model", "load_data"]


def load_object(path: str, what: str = "object") -> Any:
    """The attribute named by ``path`` = ``"package.module:attribute"`` (dots allowed after the colon).

    Args:
        path (str): the import path.
        what (str): what the path is for, used in error messages (e.g. ``"student.model"``).

    Raises:
        ValueError: malformed path, missing module or missing attribute.
    """
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"{what} must be an import path 'package.module:callable', got {path!r}")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_model(path: str, kwargs: Optional[dict] = None, what: str = "model") -> nn.Module:
    """Calls the callable at ``path`` with ``kwargs``; the result must be an ``nn.Module``."""
    factory = load_object(path, what)
    if not callable(factory):
        raise TypeError(f"{what}: {path!r} is not callable")
    model = factory(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: {path!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _is_dataset(x) -> bool:
    return hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, (tuple, list, dict, str))


def load_data(path: str, kwargs: Optional[dict] = None,
              what: str = "data.dataset") -> Tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """Calls the callable at ``path``; returns ``(train, val, test)``, the last two possibly None.

    The callable may return one Dataset (train only); a tuple ``(train[, val[, test]])``;
    an object with ``train`` / ``val`` / ``test`` attributes (e.g.
    :func:`pycompress.data.digits_splits`); or a dict with those keys.
    """
    factory = load_object(path, what)
    if not callable(factory):
        raise TypeError(f"{what}: {path!r} is not callable")
    out = factory(**(kwargs or {}))
    if isinstance(out, dict):
        unknown = set(out) - {"train", "val", "test"}
        if unknown or "train" not in out:
            raise ValueError(f"{what}: {path!r} returned a dict with keys {sorted(out)}; expected 'train' and "
                             "optionally 'val', 'test'")
        splits = (out["train"], out.get("val"), out.get("test"))
    elif hasattr(out, "train") and not _is_dataset(out):
        splits = (out.train, getattr(out, "val", None), getattr(out, "test", None))
    elif _is_dataset(out):
        splits = (out, None, None)
    elif isinstance(out, (tuple, list)) and 1 <= len(out) <= 3:
        splits = (tuple(out) + (None, None))[:3]
    else:
        raise TypeError(f"{what}: {path!r} returned {type(out).__name__}; expected a Dataset, a tuple "
                        "(train[, val[, test]]) or an object with train/val/test")
    for name, d in zip(("train", "val", "test"), splits):
        if d is not None and not _is_dataset(d):
            raise TypeError(f"{what}: the {name} split is a {type(d).__name__}, not an indexable Dataset")
    return splits
