"""What every subcommand shares: the common flags, import-path loaders, atomic report writes, tables.

Building the parser imports every subcommand module, so nothing here imports
torch at module level; the loaders import it when called.
"""

import argparse
import importlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["add_common_flags", "common_values", "add_model_and_training_flags", "model_and_training_values", "numbers", "json_object", "load_object", "build_model",
           "load_data", "atomic_write_json", "format_table", "MODELS", "DATASETS"]

# short names accepted wherever a model or a data set is given by import path
MODELS = {"vgg": "pycompress.models:VGGStyle", "resnet": "pycompress.models:ResNetStyle",
          "mobilenet": "pycompress.models:MobileNetStyle", "concat": "pycompress.models:ConcatNet"}
DATASETS = {"digits": "pycompress.data:digits_splits"}


# ---------------------------------------------------------------------------- flags
def numbers(kind):
    """An argparse ``type=`` for comma-separated ``kind`` values (``0.5,0.9``)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind.__name__}, got {text!r}")
        return values
    return parse


def json_object(text: str) -> dict:
    """An argparse ``type=`` for a JSON object (``'{"width": 8}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_common_flags(parser: argparse.ArgumentParser, output_help: str = "JSON report path"):
    """The flags every subcommand accepts, spelled the same everywhere. Each one sets a field of
    :class:`pycompress.config.WorkflowConfig` (see :func:`common_values`)."""
    g = parser.add_argument_group("common")
    g.add_argument("--config", metavar="FILE", help="TOML (.toml) or YAML (.yaml/.yml) config file")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable, applied last)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    seed = g.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, help="the run's seed")
    seed.add_argument("--seeds", type=numbers(int), help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--output", "--out", "--report", dest="output", metavar="PATH", help=output_help)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm progress bars")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="atomic, resumable checkpoints here")
    g.add_argument("--resume", action="store_true", default=None, help="continue from --checkpoint-dir")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")


def common_values(args) -> Dict[str, Any]:
    """``config key -> value`` of the common flags that were given (``None`` = not given)."""
    return {"seeds": [args.seed] if args.seed is not None else args.seeds, "device": args.device,
            "output": args.output, "progress": args.progress, "checkpoint_dir": args.checkpoint_dir,
            "resume": args.resume}


def add_model_and_training_flags(parser: argparse.ArgumentParser, default_model: str, dense_epochs: int,
                                 finetune_epochs: int, data_help: str = ""):
    """The model / data / weights and dense-training / fine-tuning flags of the compression experiments
    (``prune``, ``block-sparsify``); :func:`model_and_training_values` maps them to config keys."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help=f"one of {', '.join(MODELS)} or an import path 'pkg.mod:factory' "
                                   f"(default {default_model})")
    g.add_argument("--model-kwargs", type=json_object, help="JSON keyword arguments of the factory")
    g.add_argument("--data", help="'digits' (default) or 'pkg.mod:fn' returning (train, val, test)" + data_help)
    g.add_argument("--weights", help="trained state_dict to start from")
    t = parser.add_argument_group("training")
    t.add_argument("--dense-epochs", type=int, help=f"train the dense model first (default {dense_epochs})")
    t.add_argument("--finetune-epochs", type=int, help=f"fine-tuning epochs (default {finetune_epochs})")
    t.add_argument("--lr", type=float, help="dense training learning rate (default 0.05)")
    t.add_argument("--finetune-lr", type=float, help="default 0.01")
    t.add_argument("--batch-size", type=int, help="default 32")


def model_and_training_values(args) -> Dict[str, Any]:
    """Config keys of :func:`add_model_and_training_flags`' flags."""
    return {"model.model": args.model, "model.kwargs": args.model_kwargs, "data.dataset": args.data,
            "weights": args.weights, "dense.epochs": args.dense_epochs, "dense.lr": args.lr,
            "finetune.epochs": args.finetune_epochs, "finetune.lr": args.finetune_lr,
            "dense.batch_size": args.batch_size, "finetune.batch_size": args.batch_size}


# ---------------------------------------------------------------------------- loaders
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


def _callable(path: str, what: str, short: Dict[str, str]):
    factory = load_object(short.get(path, path), what)
    if not callable(factory):
        raise TypeError(f"{what}: {path!r} is not callable")
    return factory


def build_model(path: str, kwargs: Optional[dict] = None, what: str = "model"):
    """Calls the callable at ``path`` (or a short name of :data:`MODELS`) with ``kwargs``; must give an nn.Module."""
    from torch import nn

    model = _callable(path, what, MODELS)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: {path!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _is_dataset(x) -> bool:
    return hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, (tuple, list, dict, str))


def load_data(path: str, kwargs: Optional[dict] = None, what: str = "data.dataset",
              seed: Optional[int] = None) -> Tuple[Any, Any, Any]:
    """Calls the callable at ``path``; returns ``(train, val, test)``, the last two possibly None.

    The callable may return one Dataset (train only); a tuple ``(train[, val[, test]])``;
    an object with ``train`` / ``val`` / ``test`` attributes (e.g.
    :func:`pycompress.data.digits_splits`); or a dict with those keys. ``"digits"``
    is :func:`pycompress.data.digits_splits`, split with ``seed`` when given.
    """
    factory = _callable(path, what, DATASETS)
    kwargs = dict(kwargs or {})
    if path == "digits" and seed is not None:
        kwargs.setdefault("seed", seed)
    out = factory(**kwargs)
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


# ---------------------------------------------------------------------------- reports
def atomic_write_json(obj, path: str, **dump_kwargs):
    """Writes ``obj`` as indented JSON to ``path + '.tmp'``, then ``os.replace``: never a partial report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **dump_kwargs)
        f.write("\n")
    os.replace(tmp, path)


def format_table(head: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Rows under a header, columns padded to their widest cell; plain (two spaces) or Markdown."""
    cells: List[List[str]] = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    if markdown:
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
