"""Workflow configuration: a TOML (or YAML) file, validated, plus command-line overrides.

Every key has a default, so an empty file is valid except for the teacher
checkpoint(s). Example (TOML)::

    strategies = ["hinton", "logits", "noisy_teacher", "munge"]
    seeds = [0, 1, 2]
    output = "results/distill/report.json"

    [teacher]
    model = "pycompress.models:teacher_cnn"      # package.module:callable -> nn.Module
    checkpoints = ["teacher.pt"]                 # state_dicts; several for "ensemble"

    [student]
    model = "pycompress.models:student_cnn"

    [data]
    dataset = "pycompress.data:digits_splits"    # -> Dataset | (train, val, test) | .train/.val/.test

    [train]
    epochs = 30
    lr = 0.003

    [strategy.hinton]
    temperature = 4.0
    alpha = 0.5

Unknown keys raise ``ValueError`` naming the key and the allowed ones.
Overrides use dotted keys, ``--set strategy.hinton.temperature=8``; values are
parsed as TOML values (``8``, ``0.5``, ``true``, ``[0, 1]``, ``"x"``) and fall
back to a bare string.
"""

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from pycompress.distill.strategies import STRATEGIES, allowed_options

__all__ = ["DistillConfig", "TrainConfig", "TeacherConfig", "ModelConfig", "DataConfig", "load_config",
           "config_from_dict", "apply_overrides", "read_config_file"]


@dataclass
class TrainConfig:
    """Trainer settings (see :func:`pycompress.distill.distill`)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_accum: int = 1
    amp: str = "none"
    scheduler: str = "none"
    clip_grad_norm: float = 0.0  # 0 disables clipping
    device: str = "cpu"
    progress: bool = True


def _teacher_train() -> TrainConfig:
    return TrainConfig(epochs=15, lr=1e-3)


@dataclass
class ModelConfig:
    """A model built by calling ``model(**kwargs)``."""

    model: str = "pycompress.models:student_cnn"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """The teacher: how to build it, its trained weights, and how ``train-teacher`` trains it."""

    model: str = "pycompress.models:teacher_cnn"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoints: List[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=_teacher_train)


@dataclass
class DataConfig:
    """The data: ``dataset(**kwargs)`` returns a Dataset, ``(train[, val[, test]])`` or ``.train/.val/.test``."""

    dataset: str = "pycompress.data:digits_splits"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillConfig:
    """The whole ``pycompress distill`` configuration."""

    strategies: List[str] = field(default_factory=lambda: ["hinton"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: bool = True
    cache_teacher: bool = True
    output: str = "distill_report.json"
    checkpoint_dir: str = ""  # empty: no checkpoints
    resume: bool = False
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def _type_ok(value, typ) -> bool:
    origin = typing.get_origin(typ)
    if typ is Any:
        return True
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List):
        (item,) = typing.get_args(typ)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return isinstance(value, typ)


def _type_name(typ) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            where = f" in {prefix[:-1]}" if prefix else ""
            raise ValueError(f"unknown config key {prefix + key!r}; allowed keys{where}: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{prefix}{key}.")
        elif not _type_ok(value, typ):
            raise ValueError(f"config key {prefix + key!r} must be {_type_name(typ)}, got {value!r}")
        else:
            kwargs[key] = float(value) if typ is float else value
    return cls(**kwargs)


def config_from_dict(data: dict) -> DistillConfig:
    """Validates a parsed config; raises ValueError naming any unknown or ill-typed key."""
    cfg = _build(DistillConfig, data, "")
    for name in cfg.strategies:
        if name not in STRATEGIES:
            raise ValueError(f"config key 'strategies': unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    for name, options in cfg.strategy.items():
        if name not in STRATEGIES:
            raise ValueError(f"unknown config key 'strategy.{name}'; allowed keys in strategy: {', '.join(STRATEGIES)}")
        if not isinstance(options, dict):
            raise ValueError(f"config key 'strategy.{name}' must be a table of options, got {options!r}")
        allowed = allowed_options(name)
        for key in options:
            if key not in allowed:
                raise ValueError(f"unknown config key 'strategy.{name}.{key}'; allowed keys in strategy.{name}: "
                                 f"{', '.join(allowed)}")
    if not cfg.seeds:
        raise ValueError("config key 'seeds' must list at least one seed")
    return cfg


def read_config_file(path: str) -> dict:
    """Parses a ``.toml`` (stdlib tomllib) or ``.yaml`` / ``.yml`` (PyYAML) file into a dict."""
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid TOML: {e}") from e
    if ext in (".yaml", ".yml"):
        import yaml

        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
        return {} if data is None else data
    raise ValueError(f"config file {path!r} must end in .toml, .yaml or .yml")


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``key.path=value`` overrides to a parsed config (in place) and returns it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key.path=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])!r} is not a table")
        node[leaf] = _parse_value(text.strip())
    return data


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Reads ``path`` (if given), applies ``overrides`` and validates the result."""
    data = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides))
