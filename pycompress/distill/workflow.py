"""The distillation workflow: baseline and distilled students over seeds, one report.

Every student, with or without distillation, is trained by the same
:class:`pycompress.train.Trainer` with the same optimizer, epochs, batch size
and seeds; only the step function (and, for MUNGE, the training set) differs.
Under ``torchrun`` the same code runs data-parallel (see
:func:`pycompress.train.init_distributed`); only rank 0 prints and writes.
"""

import copy
import dataclasses
import os
import re
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pycompress.distill.munge import label_with_teacher, stack_inputs
from pycompress.distill.strategies import STRATEGIES, Strategy, make_strategy
from pycompress.cli.common import atomic_write_json, build_model, format_table as _table, load_data
from pycompress.config import DistillConfig, TeacherConfig, TrainConfig, replace, result_settings, to_dict
from pycompress.train import (Trainer, atomic_save, evaluate_classifier, init_distributed, is_main_process,
                              load_file, make_optimizer as _make_optimizer, resolve_device, world_size)

__all__ = ["distill", "distill_from_config", "DistillResult", "train_teacher", "train_teacher_from_config",
           "format_table", "load_state_dict"]


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        report (dict): the JSON report (also written to ``report_path``).
        students (dict): run label -> trained students, one per seed.
    """

    report: dict
    students: Dict[str, List[nn.Module]] = field(default_factory=dict)


def make_optimizer(name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Callable:
    """Deprecated: name the optimizer in the TrainConfig (``optimizer="adam"``)."""
    warnings.warn("pycompress.distill.workflow.make_optimizer is deprecated; set TrainConfig.optimizer",
                  DeprecationWarning, stacklevel=2)
    cfg = TrainConfig(optimizer=name, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return lambda params: _make_optimizer(cfg, params)


def load_state_dict(model: nn.Module, path: str) -> nn.Module:
    """Loads a state_dict file into ``model``: a bare state_dict or a Trainer checkpoint (its ``model``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist; train one with "
                                "`pycompress train-teacher`")
    state = load_file(path, "teacher checkpoint", map_location="cpu")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state)
    return model


def _recipe(default: TrainConfig, config: Optional[TrainConfig], optimizer, recipe: dict) -> tuple:
    """The TrainConfig of a Python call (``config`` or ``default``, with ``recipe`` fields replaced) and the
    optimizer factory, if ``optimizer`` is a callable rather than a name."""
    if isinstance(optimizer, str):
        recipe["optimizer"] = optimizer
    if recipe.get("clip_grad_norm", 0) is None:
        recipe["clip_grad_norm"] = 0.0
    return replace(config or default, **recipe), optimizer if callable(optimizer) else None


def train_teacher(teacher: nn.Module, train_data: Dataset, config: Optional[TrainConfig] = None, *,
                  eval_data: Optional[Dataset] = None, test_data: Optional[Dataset] = None, seed: int = 0,
                  device="cpu", output: Optional[str] = None, checkpoint_path: Optional[str] = None,
                  resume: bool = False, progress: bool = True, optimizer: Union[None, str, Callable] = None,
                  **recipe) -> dict:
    """Trains ``teacher`` with cross-entropy on the shared Trainer; optionally saves its state_dict.

    Args:
        config (TrainConfig, optional): default ``TeacherConfig().train`` (15 epochs, Adam, lr 1e-3);
            keyword arguments named like its fields replace them.

    Returns:
        dict: ``parameters``, ``accuracy`` (on ``test_data``, else ``eval_data``, else
        ``train_data``), ``evaluated_on`` and ``history``.
    """
    init_distributed()
    cfg, opt = _recipe(TeacherConfig().train, config, optimizer, recipe)
    history = Trainer(teacher, train_data, cfg, eval_data=eval_data, seed=seed, device=resolve_device(device),
                      optimizer=opt, checkpoint_path=checkpoint_path, progress=progress).fit(resume=resume)
    split, data = _eval_split(train_data, eval_data, test_data)
    acc = evaluate_classifier(teacher, data)["accuracy"]
    if output and is_main_process():
        atomic_save(teacher.state_dict(), output)
    return {"parameters": _n_params(teacher), "accuracy": acc, "evaluated_on": split, "history": history}


def train_teacher_from_config(cfg: DistillConfig, output: str) -> dict:
    """``pycompress train-teacher``: builds the teacher and data of ``cfg`` and trains it with ``cfg.teacher.train``."""
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs)
    seed = cfg.single_seed()
    torch.manual_seed(seed)
    teacher = build_model(cfg.teacher.model, cfg.teacher.kwargs, "teacher.model")
    ckpt = os.path.join(cfg.checkpoint_dir, f"teacher_seed{seed}.pt") if cfg.checkpoint_dir else None
    return train_teacher(teacher, train, cfg.teacher.train, eval_data=val, test_data=test, seed=seed,
                         device=cfg.device, output=output, checkpoint_path=ckpt, resume=cfg.resume,
                         progress=cfg.progress)


def _eval_split(train, val, test):
    if test is not None:
        return "test", test
    if val is not None:
        return "val", val
    return "train", train


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_inputs(data: Dataset) -> torch.Tensor:
    if isinstance(data, TensorDataset):
        return data.tensors[0][:2]
    return torch.as_tensor(data[0][0]).unsqueeze(0)


@torch.no_grad()
def _output_size(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        return model(x).shape[-1]
    finally:
        model.train(was_training)


def _normalise_strategies(strategy, strategy_options, baseline: bool) -> Dict[str, Strategy]:
    """label -> Strategy. Names get their options from ``strategy_options[name]``."""
    strategy_options = strategy_options or {}
    unknown = sorted(set(strategy_options) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"strategy_options has unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if isinstance(strategy, dict):
        items = list(strategy.items())
    else:
        items = [(None, s) for s in (strategy if isinstance(strategy, (list, tuple)) else [strategy])]
    if not items and not baseline:
        raise ValueError("strategy must name at least one strategy (or keep baseline=True)")
    names = [s if isinstance(s, str) else getattr(s, "name", None) for _, s in items]
    out: Dict[str, Strategy] = {}
    for label, s in items:
        s = make_strategy(s, strategy_options.get(s) if isinstance(s, str) else None)
        if label is None:
            label = s.name
            if names.count(s.name) > 1:  # e.g. a temperature sweep: label by the options that differ
                defaults = make_strategy(s.name).options()
                diff = {k: v for k, v in s.options().items() if defaults[k] != v}
                label = f"{s.name}({', '.join(f'{k}={v}' for k, v in diff.items())})"
        if label in out or label == "baseline":
            raise ValueError(f"two runs share the label {label!r}; pass strategy as a dict of unique labels")
        out[label] = s
    return out


def _new_student(student, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(student, nn.Module):
        return copy.deepcopy(student)
    model = student()
    if not isinstance(model, nn.Module):
        raise TypeError(f"student factory returned {type(model).__name__}, expected an nn.Module")
    return model


def _summary(values: Sequence[float]) -> dict:
    return {"accuracy": list(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def distill(student: Union[nn.Module, Callable[[], nn.Module]], teacher: Union[nn.Module, Sequence[nn.Module], None],
            train_data: Dataset, strategy: Union[None, str, Strategy, Sequence, Dict[str, Union[str, Strategy]]] = None,
            config: Optional[DistillConfig] = None, *, strategy_options: Optional[Dict[str, dict]] = None,
            eval_data: Optional[Dataset] = None, test_data: Optional[Dataset] = None,
            optimizer: Union[None, str, Callable] = None, print_table: bool = True,
            report_path: Optional[str] = None, **options) -> DistillResult:
    """Distils ``teacher`` into ``student`` with one or more strategies, against a no-distillation baseline.

    For each seed, the baseline student (cross-entropy only, if ``baseline``) and
    one student per strategy are trained the same way on the shared Trainer,
    then evaluated; the report gives each run's accuracy as mean ± std over seeds.

    Args:
        student (nn.Module | callable): a module (deep-copied for every run, so all
            runs start from its weights) or a zero-argument factory (called after
            ``torch.manual_seed(seed)``, so each seed gets its own initialisation).
        teacher (nn.Module | list[nn.Module]): the trained teacher; a list gives
            ``ensemble`` its teachers, and single-teacher strategies use the first.
        train_data (Dataset): items ``(x, y)`` with integer class labels.
        strategy: a name in :data:`STRATEGIES`, a :class:`Strategy`, a list of those,
            or a dict ``label -> name | Strategy``; empty (baseline only) needs ``baseline``.
            Default: ``config.strategies``.
        config (DistillConfig, optional): every setting, with the defaults of the CLI and
            the config file (``DistillConfig()``: seeds 0, 1, 2; 30 epochs of Adam at lr 3e-3).
        strategy_options (dict): ``name -> {option: value}`` for strategies given by name
            (default ``config.strategy``).
        eval_data (Dataset, optional): evaluated after every epoch.
        test_data (Dataset, optional): final accuracy (else ``eval_data``, else ``train_data``).
        optimizer (str | callable): a name for ``train.optimizer`` or ``params -> Optimizer``.
        print_table (bool): print the results table (rank 0).
        report_path (str): deprecated spelling of ``output``.
        **options: fields of :class:`DistillConfig` (``seeds``, ``baseline``, ``cache_teacher``,
            ``device``, ``output``, ``progress``, ``checkpoint_dir``, ``resume``, ``train``) or of
            its :class:`TrainConfig` ``train`` (``epochs``, ``lr``, ``batch_size``, ...), replacing
            those of ``config``. ``cache_teacher`` computes the teacher's logits on the
            training set once (needs data without random augmentation); ``resume``
            continues each run from its checkpoint in ``checkpoint_dir`` (finished runs are
            not retrained); ``output`` is the JSON report ("" = none).

    Returns:
        DistillResult: the report and the trained students.

    Raises:
        ValueError: unknown strategy or option, missing teacher, too few teachers for
            ``ensemble``, or teacher and student output sizes that disagree.

    Example:
        >>> from pycompress.data import digits_splits
        >>> from pycompress.models import student_cnn
        >>> d = digits_splits()
        >>> result = distill(student_cnn, teacher, d.train, ["hinton", "logits"], eval_data=d.val,
        ...                  test_data=d.test, seeds=[0, 1, 2], epochs=30)
        >>> result.report["runs"]["hinton"]["mean"]
    """
    init_distributed()
    if report_path is not None:
        warnings.warn("distill(report_path=...) is deprecated; use output=", DeprecationWarning, stacklevel=2)
        options["output"] = report_path
    cfg = _distill_config(config, optimizer, options)
    opt = optimizer if callable(optimizer) else None
    seeds, train_cfg = cfg.seeds, cfg.train
    strategies = _normalise_strategies(cfg.strategies if strategy is None else strategy,
                                       cfg.strategy if strategy_options is None else strategy_options, cfg.baseline)
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else ([] if teacher is None else [teacher])
    if not teachers:
        raise ValueError("missing teacher: distill needs a trained teacher; pass teacher= (train one with "
                         "`pycompress train-teacher` or load a state_dict)")
    for i, t in enumerate(teachers):
        if not isinstance(t, nn.Module):
            raise TypeError(f"teacher[{i}] must be an nn.Module, got {type(t).__name__}")
    for label, s in strategies.items():
        if len(teachers) < s.teachers_required:
            raise ValueError(f"strategy {label!r} needs at least {s.teachers_required} teachers, got {len(teachers)}")
    device = resolve_device(cfg.device)
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    probe = _first_inputs(train_data).to(device)
    n_student_out = _output_size(_new_student(student, seeds[0]).to(device), probe)
    for i, t in enumerate(teachers):
        n_out = _output_size(t, probe)
        if n_out != n_student_out:
            raise ValueError(f"teacher{f'[{i}]' if len(teachers) > 1 else ''} has {n_out} outputs but the student "
                             f"has {n_student_out}; they must predict the same classes")

    split, eval_split = _eval_split(train_data, eval_data, test_data)
    report = {"evaluated_on": split, "seeds": list(seeds),
              "training": {**to_dict(train_cfg), "optimizer": train_cfg.optimizer if opt is None else repr(opt),
                           "global_batch": train_cfg.batch_size * world_size(), "world_size": world_size(),
                           "cache_teacher": cfg.cache_teacher},
              "teacher": {"parameters": _n_params(teachers[0]),
                          "accuracy": evaluate_classifier(teachers[0], eval_split)["accuracy"]},
              "runs": {}}
    if len(teachers) > 1:
        report["teacher"]["all_accuracies"] = [evaluate_classifier(t, eval_split)["accuracy"] for t in teachers]
    result = DistillResult(report)

    # What the runs share beside the training recipe; each run adds its strategy's options.
    settings = result_settings(cfg, "train", "strategies", "strategy")

    def run(label: str, step_fn, data_for_seed, options=None):
        accs, val_accs = [], []
        result.students[label] = []
        for seed in seeds:
            model = _new_student(student, seed)
            ckpt = (os.path.join(cfg.checkpoint_dir, f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}_seed{seed}.pt")
                    if cfg.checkpoint_dir else None)
            history = Trainer(model, data_for_seed(seed), train_cfg, step_fn=step_fn, eval_data=eval_data,
                              optimizer=opt, seed=seed, device=device, checkpoint_path=ckpt,
                              progress=cfg.progress,
                              run_config={**settings, "label": label, "options": options or {}}).fit(resume=cfg.resume)
            accs.append(evaluate_classifier(model, eval_split)["accuracy"])
            if history and "accuracy" in history[-1]:
                val_accs.append(history[-1]["accuracy"])
            result.students[label].append(model)
        return accs, val_accs

    if cfg.baseline:
        accs, val_accs = run("baseline", None, lambda seed: train_data)
        report["runs"]["baseline"] = {"strategy": None, "options": {}, **_summary(accs), "val_accuracy": val_accs}
        report["student"] = {"parameters": _n_params(result.students["baseline"][0])}
    for label, s in strategies.items():
        def teacher_fn(x, s=s):
            return s.teacher_logits(teachers, x.to(device))

        # MUNGE labels its own (larger) set in prepare(); the others can reuse one pass of the teacher
        cache = cfg.cache_teacher and type(s).prepare is Strategy.prepare
        cached = _with_teacher_logits(train_data, teacher_fn) if cache else train_data
        accs, val_accs = run(label, s.step_fn(teacher_fn, cached=cache),
                             lambda seed, s=s, cached=cached, tf=teacher_fn: s.prepare(cached, tf, seed), s.options())
        entry = {"strategy": s.name, "options": s.options(), **_summary(accs), "val_accuracy": val_accs}
        if hasattr(s, "generator_used"):
            entry["generator_used"] = s.generator_used
        if s.name == "ensemble":
            entry["teacher_accuracy"] = _accuracy_of_logits(teacher_fn, eval_split)
        report["runs"][label] = entry
        report.setdefault("student", {"parameters": _n_params(result.students[label][0])})

    if is_main_process():
        if cfg.output:
            atomic_write_json(report, cfg.output)
        if print_table:
            print(format_table(report))
    return result


def _distill_config(config: Optional[DistillConfig], optimizer, options: dict) -> DistillConfig:
    """``config`` (default ``DistillConfig()``) with Python keyword options: DistillConfig fields, or
    TrainConfig fields of its ``train`` section."""
    cfg = config or DistillConfig()
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = {k: options.pop(k) for k in list(options) if k in train_fields and k != "train"}
    for key in ("checkpoint_dir", "output"):
        if key in options and options[key] is None:
            options[key] = ""
    if "seeds" in options and not isinstance(options["seeds"], int):
        options["seeds"] = list(options["seeds"])
    if "seeds" in options and (not options["seeds"] or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in options["seeds"])):
        raise ValueError(f"seeds must be a non-empty list of ints, got {options['seeds']!r}")
    cfg = replace(cfg, **options)
    train, _ = _recipe(cfg.train, None, optimizer, recipe)
    return dataclasses.replace(cfg, train=train)


def distill_from_config(cfg: DistillConfig) -> DistillResult:
    """``pycompress distill``: builds the teacher(s), student and data that ``cfg`` names, then :func:`distill`
    (or, for detection strategies such as ``mehta_ozturk``, :func:`pycompress.detection.distill.distill_detector`,
    whose report it returns as ``DistillResult.report``)."""
    if cfg.strategies and all(STRATEGIES[name].task == "detection" for name in cfg.strategies):
        from pycompress.detection.distill import distill_detector

        return DistillResult(distill_detector(cfg))
    if not cfg.teacher.checkpoints:
        raise ValueError("missing teacher: set teacher.checkpoints in the config or pass --teacher-checkpoint "
                         "(train one with `pycompress train-teacher --output teacher.pt`)")
    teachers = [load_state_dict(build_model(cfg.teacher.model, cfg.teacher.kwargs, "teacher.model"), path)
                for path in cfg.teacher.checkpoints]
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs)

    def student():
        return build_model(cfg.student.model, cfg.student.kwargs, "student.model")

    return distill(student, teachers, train, config=cfg, eval_data=val, test_data=test)


@torch.no_grad()
def _accuracy_of_logits(teacher_fn: Callable, data: Dataset) -> float:
    x, y = stack_inputs(data), _labels(data)
    return float((label_with_teacher(teacher_fn, x).argmax(1) == y).float().mean())


def _labels(data: Dataset) -> torch.Tensor:
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    return torch.as_tensor([int(data[i][1]) for i in range(len(data))])


def _with_teacher_logits(data: Dataset, teacher_fn: Callable) -> TensorDataset:
    """``(x, y, teacher_logits)`` for every example: the teacher runs once, not every step."""
    x = stack_inputs(data)
    return TensorDataset(x, _labels(data), label_with_teacher(teacher_fn, x))


def format_table(report: dict) -> str:
    """A Markdown table of a :func:`distill` report: teacher, baseline and each strategy, mean ± std."""
    n = len(report["seeds"])
    t = report["teacher"]
    rows = [("teacher", f"{t['parameters']:,}", f"{t['accuracy']:.4f}", "1 model", "")]
    for i, acc in enumerate(t.get("all_accuracies", [])[1:], start=1):
        rows.append((f"teacher[{i}]", f"{t['parameters']:,}", f"{acc:.4f}", "1 model", ""))
    base = report["runs"].get("baseline")
    n_student = f"{report.get('student', {}).get('parameters', 0):,}"
    for label, r in report["runs"].items():
        delta = "" if base is None or label == "baseline" else f"{r['mean'] - base['mean']:+.4f}"
        name = "student, no distillation" if label == "baseline" else f"student, {label}"
        rows.append((name, n_student, f"{r['mean']:.4f} ± {r['std']:.4f}", f"{n} seeds", delta))
        if "teacher_accuracy" in r:
            rows.append((f"  ({label} teachers combined)", "", f"{r['teacher_accuracy']:.4f}", "", ""))
    head = ("model", "parameters", f"{report['evaluated_on']} accuracy", "runs", "vs baseline")
    return _table(head, rows, markdown=True)
