"""One configuration path for every workflow: typed dataclasses built from a file, ``--set`` and Python.

Each workflow (``distill`` and ``train-teacher``, ``prune``, ``block-sparsify``)
has one dataclass here. The command line, a TOML / YAML file and the Python API
all produce that same object:

- a file (:func:`read_config_file`) gives a nested dict; unknown keys are
  rejected by name (:func:`from_dict`), listing the allowed ones;
- ``--set key.path=value`` overrides (:func:`apply_overrides`) parse ``value``
  as a TOML value (``8``, ``0.5``, ``true``, ``[0, 1]``, ``"x"``; anything else
  is a bare string) and are applied to that dict;
- command-line flags are typed values set on the dict directly
  (:func:`load_config`'s ``values``), never re-encoded as ``--set`` strings;
- Python callers pass keyword arguments, applied with :func:`replace`.

A partial section is merged onto the workflow's own default for that section
(``[teacher.train] lr = 0.01`` keeps the teacher's 15 epochs), so every default
lives in exactly one place: the dataclass field below.

This module imports neither torch nor the compiled extension.
"""

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, TypeVar

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "WorkflowConfig", "TeacherConfig", "DistillConfig",
           "DetectionDistillConfig", "SinghConfig", "PruneConfig", "BlockSparsifyConfig", "TrainDetectorConfig",
           "read_config_file", "parse_value", "apply_overrides", "from_dict", "load_config", "replace", "to_dict"]

C = TypeVar("C")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine")
AMP = ("none", "bf16", "fp16")


def _choice(where: str, value, allowed: Sequence[str]):
    if value not in allowed:
        raise ValueError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class TrainConfig:
    """How a model is trained by :class:`pycompress.train.Trainer` (the recipe, not where it runs).

    ``scheduler="cosine"`` anneals the learning rate to 0 over the run's optimizer
    steps, which the Trainer counts itself, after ``warmup_steps`` of linear warm-up.
    ``clip_grad_norm = 0`` disables clipping.
    ``epochs = 0`` means "skip this training" to the workflows that have an optional one.
    """

    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_accum: int = 1
    amp: str = "none"
    scheduler: str = "none"
    warmup_steps: int = 0
    clip_grad_norm: float = 0.0
    drop_last: bool = False

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("amp", self.amp, AMP)
        if self.warmup_steps < 0 or (self.warmup_steps and self.scheduler != "cosine"):
            raise ValueError(f"warmup_steps must be >= 0 and needs scheduler='cosine', got {self.warmup_steps} "
                             f"with scheduler={self.scheduler!r}")


@dataclass
class ModelConfig:
    """A model built by calling ``model(**kwargs)``: an import path ``pkg.module:callable``
    or a short name of :data:`pycompress.cli.common.MODELS`."""

    model: str = "pycompress.models:student_cnn"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """``dataset(**kwargs)`` returns a Dataset, ``(train[, val[, test]])`` or ``.train/.val/.test``;
    ``"digits"`` is :func:`pycompress.data.digits_splits` split with the run's seed."""

    dataset: str = "pycompress.data:digits_splits"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkflowConfig:
    """The settings every workflow has, behind the same command-line flags everywhere
    (``--seed``/``--seeds``, ``--device``, ``--output``, ``--progress``, ``--checkpoint-dir``, ``--resume``)."""

    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "cpu"          # cpu, cuda, cuda:N or auto
    output: str = ""             # the report (or, for train-teacher, the state_dict); "" = none
    progress: bool = True
    checkpoint_dir: str = ""     # "" = no checkpoints
    resume: bool = False

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume (--resume) needs checkpoint_dir (--checkpoint-dir)")

    def single_seed(self) -> int:
        """The seed of a workflow that runs once; refuses several."""
        if len(self.seeds) != 1:
            raise ValueError(f"seeds: this workflow runs one seed, got {self.seeds}; use --seed N")
        return self.seeds[0]


def _teacher_train() -> TrainConfig:
    return TrainConfig(epochs=15, batch_size=64, optimizer="adam", lr=1e-3)


def _student_train() -> TrainConfig:
    return TrainConfig(epochs=30, batch_size=64, optimizer="adam", lr=3e-3)


@dataclass
class TeacherConfig:
    """The teacher: how to build it, its trained weights, and how ``train-teacher`` trains it."""

    model: str = "pycompress.models:teacher_cnn"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoints: List[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=_teacher_train)


TEACHER_CACHE_DTYPES = ("float16", "float32")


@dataclass
class DetectionDistillConfig:
    """The detection part of ``pycompress distill`` (strategy ``mehta_ozturk``; docs/detection_distill.md).

    The student, teacher and data of :class:`DistillConfig` are then detectors of
    :mod:`pycompress.models.detection` (registered name or import path) and detection data with an
    ``unlabeled`` split (:func:`pycompress.data.digit_detection_splits`); ``cache_teacher`` stores the
    teacher's map once, in ``teacher_cache_dtype``, with its FM-NMS keep mask.
    """

    unlabeled_ratio: float = 0.0         # unlabeled images mixed in, as a multiple of the labeled set
    teacher_cache_dtype: str = "float16"  # float32 makes the cache exact (bit for bit the teacher's map)
    score_threshold: float = 0.01        # postprocess of the evaluation
    iou_threshold: float = 0.5
    max_detections: int = 100
    num_threads: int = 0                 # torch.set_num_threads (0: torch's default)

    def __post_init__(self):
        _choice("detection.teacher_cache_dtype", self.teacher_cache_dtype, TEACHER_CACHE_DTYPES)
        if not 0 <= self.unlabeled_ratio < float("inf"):
            raise ValueError(f"detection.unlabeled_ratio must be a finite number >= 0, got {self.unlabeled_ratio}")
        if self.num_threads < 0:
            raise ValueError(f"detection.num_threads must be >= 0, got {self.num_threads}")


@dataclass
class DistillConfig(WorkflowConfig):
    """``pycompress distill`` and ``pycompress train-teacher`` (its ``teacher``, ``data`` and seed)."""

    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    strategies: List[str] = field(default_factory=lambda: ["hinton"])
    baseline: bool = True
    cache_teacher: bool = True
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_student_train)
    strategy: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> options
    detection: DetectionDistillConfig = field(default_factory=DetectionDistillConfig)  # detection strategies only

    def __post_init__(self):
        super().__post_init__()
        from pycompress.distill.strategies import STRATEGIES, allowed_options

        for name in self.strategies:
            if name not in STRATEGIES:
                raise ValueError(f"strategies: unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        if len({STRATEGIES[name].task for name in self.strategies}) > 1:
            raise ValueError(f"strategies: {self.strategies} mix classification and detection strategies; "
                             "one distill run is one task")
        for name, options in self.strategy.items():
            if name not in STRATEGIES:
                raise ValueError(f"unknown config key 'strategy.{name}'; allowed keys in strategy: "
                                 f"{', '.join(STRATEGIES)}")
            if not isinstance(options, dict):
                raise ValueError(f"config key 'strategy.{name}' must be a table of options, got {options!r}")
            allowed = allowed_options(name)
            for key in options:
                if key not in allowed:
                    raise ValueError(f"unknown config key 'strategy.{name}.{key}'; allowed keys in "
                                     f"strategy.{name}: {', '.join(allowed)}")


@dataclass
class SinghConfig:
    """Options of the phased Singh et al. 2019 schedule (criterion ``singh``)."""

    phases: int = 3
    l1: float = 1e-4
    sparsity_steps: int = 100
    rho: float = 0.9
    rounds: int = 3
    lr: Optional[float] = None   # SGD learning rate of sparsity induction (None: finetune.lr)
    tolerance: float = 0.01      # quality (accuracy, a detector's AP50) the sparsity threshold may cost on val
    recovery_steps: int = 0      # SGD steps each threshold's pruned candidate trains before it is validated
    phase_layers: List[List[str]] = field(default_factory=list)  # layer patterns per phase; empty: `phases` slices


def _dense_train() -> TrainConfig:
    return TrainConfig(epochs=30, lr=0.05, weight_decay=1e-4, scheduler="cosine")


def _finetune_train() -> TrainConfig:
    return TrainConfig(epochs=20, lr=0.01, weight_decay=1e-4, scheduler="cosine")


CRITERIA = ("taylor", "taylor_weight", "l1", "l2", "bn_scale", "singh", "random")


@dataclass
class PruneConfig(WorkflowConfig):
    """``pycompress prune``: dense training -> :func:`pycompress.prune.prune` -> fine-tuning -> report."""

    progress: bool = False       # a long experiment logs per stage; bars on request

    model: ModelConfig = field(default_factory=lambda: ModelConfig(model="vgg"))
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="digits"))
    weights: str = ""            # a trained state_dict to start from, dense or pruned (an earlier --save)
    save: str = ""               # where to write the pruned, fine-tuned state_dict
    criterion: str = "taylor"
    target_params: Optional[float] = None
    target_flops: Optional[float] = None   # fraction of the dense FLOPs (2 x MACs) to keep
    channel_ratio: Optional[float] = None
    steps: int = 1
    units_per_step: Optional[int] = None
    per_layer: bool = False
    exclude: List[str] = field(default_factory=list)  # module names never pruned
    round_to: int = 1
    max_layer_ratio: float = 0.9
    score_batches: int = 8
    fine_tune_steps: int = 0     # optimizer steps after each pruning step
    report_steps: bool = False   # test metrics and interleaved latency of the model after every step (phase)
    flops_lambda: float = 0.0
    singh: SinghConfig = field(default_factory=SinghConfig)
    dense: TrainConfig = field(default_factory=_dense_train)
    finetune: TrainConfig = field(default_factory=_finetune_train)
    latency_batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    task: str = "auto"           # loss and quality: classification (accuracy), detection (AP50); auto: by model
    task_options: Dict[str, Any] = field(default_factory=dict)  # e.g. detection: loss, score_threshold
    num_threads: int = 0         # torch.set_num_threads (0: torch's default)

    def __post_init__(self):
        super().__post_init__()
        _choice("criterion", self.criterion, CRITERIA)
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")  # the one target is checked by prune()


def _detector_train() -> TrainConfig:
    return TrainConfig(epochs=10, batch_size=32, optimizer="adamw", lr=2e-3, weight_decay=5e-4, scheduler="cosine",
                       warmup_steps=100, clip_grad_norm=10.0)


@dataclass
class TrainDetectorConfig(WorkflowConfig):
    """``pycompress train-detector``: a detector of :mod:`pycompress.models.detection` (by registered
    name or import path) trained on detection data, evaluated with COCO AP, measured and reported."""

    detector: ModelConfig = field(default_factory=lambda: ModelConfig(model="yolo_teacher"))
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="pycompress.data:digit_detection_splits"))
    loss: Dict[str, Any] = field(default_factory=dict)   # options of the detector's criterion (lambda_obj, ...)
    train: TrainConfig = field(default_factory=_detector_train)
    eval_every_epoch: bool = True        # val AP50 after each epoch, in the history
    score_threshold: float = 0.01        # postprocess of the evaluation
    iou_threshold: float = 0.5
    max_detections: int = 100
    latency_batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    num_threads: int = 0                 # torch.set_num_threads (0: torch's default)
    save_model: str = ""                 # the trained state_dict ("" = none)
    checkpoint_every: int = 0            # also checkpoint every N steps (0: at epoch ends only)

    def __post_init__(self):
        super().__post_init__()
        for name in ("checkpoint_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class BlockSparsifyConfig(WorkflowConfig):
    """``pycompress block-sparsify``: block-sparse copies of a model at several sparsities against the dense one."""

    progress: bool = False

    model: ModelConfig = field(default_factory=lambda: ModelConfig(model="resnet"))
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="digits"))  # "none": latency only
    weights: str = ""
    sparsities: List[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    block_size: List[int] = field(default_factory=list)   # [bo, bk]; empty = per layer
    exclude: List[str] = field(default_factory=list)      # fnmatch patterns kept dense
    fold_bn: bool = False
    dense: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0, lr=0.05, weight_decay=1e-4,
                                                                   scheduler="cosine"))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0, lr=0.01, weight_decay=1e-4,
                                                                      scheduler="cosine"))
    input_shape: List[int] = field(default_factory=list)  # C, H, W; empty = the data's sample shape
    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    repeats: int = 30

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.sparsities if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"sparsities (--sparsity) must be in [0, 1], got {bad}")
        if self.block_size and len(self.block_size) != 2:
            raise ValueError(f"block_size (--block-size) must be bo,bk, got {self.block_size}")
        if self.input_shape and len(self.input_shape) != 3:
            raise ValueError(f"input_shape (--input-shape) must be C,H,W, got {self.input_shape}")
        if self.data.dataset == "none" and not self.input_shape:
            raise ValueError("data none (--data none) needs --input-shape")
        if self.data.dataset == "none" and (self.dense.epochs or self.finetune.epochs):
            raise ValueError("training needs --data (dense.epochs and finetune.epochs must be 0 with --data none)")


# ---------------------------------------------------------------------------- typed building
def _type_ok(value, typ) -> bool:
    origin = typing.get_origin(typ)
    if typ is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, t) for t in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List):
        (item,) = typing.get_args(typ)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return isinstance(value, typ)


def _type_name(typ) -> str:
    if typing.get_origin(typ) is None and hasattr(typ, "__name__"):
        return typ.__name__
    return str(typ).replace("typing.", "")


def _coerce(value, typ):
    if typ is float or (typing.get_origin(typ) is typing.Union and float in typing.get_args(typ)):
        return value if value is None else float(value)
    if typing.get_origin(typ) in (list, List):
        (item,) = typing.get_args(typ)
        return [_coerce(v, item) for v in value]
    return value


def from_dict(default: C, data: Mapping, prefix: str = "") -> C:
    """``default`` (a dataclass instance) with the keys of ``data`` replaced, recursively and type-checked.

    Raises:
        ValueError: a key that is not a field (naming it and the allowed ones), or a
            value of the wrong type (naming the key).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix[:-1] or 'config'} must be a table of keys, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(default)]  # declaration order, for the error message
    hints = typing.get_type_hints(type(default))
    changes = {}
    for key, value in data.items():
        if key not in fields:
            where = f" in {prefix[:-1]}" if prefix else ""
            raise ValueError(f"unknown config key {prefix + key!r}; allowed keys{where}: {', '.join(fields)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            changes[key] = from_dict(getattr(default, key), value, f"{prefix}{key}.")
        elif not _type_ok(value, typ):
            raise ValueError(f"config key {prefix + key!r} must be {_type_name(typ)}, got {value!r}")
        else:
            changes[key] = _coerce(value, typ)
    return dataclasses.replace(default, **changes)


def read_config_file(path: str) -> dict:
    """Parses a ``.toml`` (stdlib tomllib) or ``.yaml`` / ``.yml`` (PyYAML) file into a dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: another extension, a syntax error, or a top level that is not a mapping
            (each naming the file).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid TOML: {e}") from e
    if ext not in (".yaml", ".yml"):
        raise ValueError(f"config file {path!r} must end in .toml, .yaml or .yml")
    import yaml

    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys at the top level, "
                         f"got a {type(data).__name__}")
    return data


def parse_value(text: str):
    """A ``--set`` value: a TOML value if it parses as one, else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(data: dict, dotted: str, value, what: str):
    *parents, leaf = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{what}: {'.'.join(parents[:i + 1])!r} is not a table")
    node[leaf] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``key.path=value`` overrides to a parsed config (in place) and returns it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} must look like key.path=value")
        _set_path(data, key.strip(), parse_value(text.strip()), f"--set {item!r}")
    return data


def load_config(default: C, path: Optional[str] = None, overrides: Sequence[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> C:
    """The workflow config: ``default``, then the file at ``path``, then ``values``, then ``overrides``.

    Args:
        default: the workflow's config instance (e.g. ``DistillConfig()``); its class decides the keys.
        path (str, optional): a TOML / YAML file.
        overrides (list[str]): ``key.path=value`` strings (``--set``), applied last.
        values (dict): ``"key.path" -> typed value`` from command-line flags; ``None`` values are skipped.
    """
    data = read_config_file(path) if path else {}
    for dotted, value in (values or {}).items():
        if value is not None:
            _set_path(data, dotted, value, dotted)
    return from_dict(default, apply_overrides(data, overrides))


def replace(cfg: C, **changes) -> C:
    """``cfg`` with fields replaced by keyword (Python API); a nested dataclass field takes a dict or an
    instance. Unknown names raise ``TypeError`` naming them and the allowed ones."""
    fields = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise TypeError(f"unexpected argument {unknown[0]!r}; allowed: {', '.join(fields)}")
    as_dict = {k: v for k, v in changes.items() if not dataclasses.is_dataclass(v)}
    instances = {k: v for k, v in changes.items() if dataclasses.is_dataclass(v)}
    return from_dict(dataclasses.replace(cfg, **instances), as_dict)


def to_dict(cfg) -> dict:
    """The config as plain data (for reports)."""
    return dataclasses.asdict(cfg)


# WorkflowConfig fields that cannot change a training's result: where reports and checkpoints
# go, the progress bar, whether to resume, and the list of seeds (each run records its own).
NOT_RESULT_FIELDS = ("seeds", "output", "progress", "checkpoint_dir", "resume")


def result_settings(cfg, *exclude: str) -> dict:
    """``cfg`` as plain data without the fields that cannot change a result (and ``exclude``):
    what a checkpoint records so that a resume with other settings is refused."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_RESULT_FIELDS + exclude}
