"""The distillation workflow: baseline and distilled students over seeds, one report.

Every student, with or without distillation, is trained by the same
:class:`pycompress.train.Trainer` with the same optimizer, epochs, batch size
and seeds; only the step function (and, for MUNGE, the training set) differs.
Under ``torchrun`` the same code runs data-parallel (see
:func:`pycompress.train.init_distributed`); only rank 0 prints and writes.
"""

import copy
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pycompress.distill.munge import label_with_teacher, stack_inputs
from pycompress.distill.strategies import STRATEGIES, Strategy, make_strategy
from pycompress.train import Trainer, atomic_save, evaluate_classifier, init_distributed

__all__ = ["distill", "DistillResult", "train_teacher", "format_table", "make_optimizer", "load_state_dict"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        report (dict): the JSON report (also written to ``report_path``).
        students (dict): run label -> trained students, one per seed.
    """

    report: dict
    students: Dict[str, List[nn.Module]] = field(default_factory=dict)


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``auto`` picks CUDA when available; under torchrun on CUDA, this rank's ``cuda:LOCAL_RANK``."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def make_optimizer(name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Callable:
    """``params -> Optimizer`` for ``name`` in ``adam`` | ``adamw`` | ``sgd``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return lambda params: cls(params, lr=lr, weight_decay=weight_decay)


def load_state_dict(model: nn.Module, path: str) -> nn.Module:
    """Loads a state_dict file into ``model``: a bare state_dict or a Trainer checkpoint (its ``model``)."""
    if not os.path.exists(path):
        raise ValueError(f"teacher checkpoint {path!r} does not exist; train one with `pycompress train-teacher`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state)
    return model


def _trainer_kwargs(epochs, batch_size, optimizer, lr, momentum, weight_decay, grad_accum, amp, scheduler,
                    clip_grad_norm, device, progress) -> dict:
    if amp not in AMP:
        raise ValueError(f"amp must be one of {', '.join(AMP)}, got {amp!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    return dict(epochs=epochs, batch_size=batch_size,
                optimizer=optimizer if callable(optimizer) else make_optimizer(optimizer, lr, momentum, weight_decay),
                lr=lr, grad_accum=grad_accum, amp_dtype=AMP[amp], clip_grad_norm=clip_grad_norm or None,
                device=device, progress=progress, _scheduler=scheduler)


def _fit(model, train_data, *, seed, step_fn=None, eval_data=None, checkpoint_path=None, resume=False, **kw):
    scheduler = kw.pop("_scheduler")
    if scheduler == "cosine":
        per_rank = math.ceil(len(train_data) / _world_size())
        steps = kw["epochs"] * math.ceil(math.ceil(per_rank / kw["batch_size"]) / kw["grad_accum"])
        kw["scheduler"] = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    trainer = Trainer(model, train_data, step_fn=step_fn, eval_data=eval_data, seed=seed,
                      checkpoint_path=checkpoint_path, **kw)
    return trainer.fit(resume=resume)


def train_teacher(teacher: nn.Module, train_data: Dataset, *, eval_data: Optional[Dataset] = None,
                  test_data: Optional[Dataset] = None, seed: int = 0, epochs: int = 15, batch_size: int = 64,
                  optimizer: Union[str, Callable] = "adam", lr: float = 1e-3, momentum: float = 0.9,
                  weight_decay: float = 0.0, grad_accum: int = 1, amp: str = "none", scheduler: str = "none",
                  clip_grad_norm: Optional[float] = None, device="cpu", output: Optional[str] = None,
                  checkpoint_path: Optional[str] = None, resume: bool = False, progress: bool = True) -> dict:
    """Trains ``teacher`` with cross-entropy on the shared Trainer; optionally saves its state_dict.

    Returns:
        dict: ``parameters``, ``accuracy`` (on ``test_data``, else ``eval_data``, else
        ``train_data``), ``evaluated_on`` and ``history``.
    """
    init_distributed()
    device = resolve_device(device)
    kw = _trainer_kwargs(epochs, batch_size, optimizer, lr, momentum, weight_decay, grad_accum, amp, scheduler,
                         clip_grad_norm, device, progress)
    history = _fit(teacher, train_data, seed=seed, eval_data=eval_data, checkpoint_path=checkpoint_path,
                   resume=resume, **kw)
    split, data = _eval_split(train_data, eval_data, test_data)
    acc = evaluate_classifier(teacher, data)["accuracy"]
    if output and _is_main():
        atomic_save(teacher.state_dict(), output)
    return {"parameters": _n_params(teacher), "accuracy": acc, "evaluated_on": split, "history": history}


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
            train_data: Dataset, strategy: Union[str, Strategy, Sequence, Dict[str, Union[str, Strategy]]] = "hinton",
            *, strategy_options: Optional[Dict[str, dict]] = None, eval_data: Optional[Dataset] = None,
            test_data: Optional[Dataset] = None, seeds: Sequence[int] = (0,), baseline: bool = True,
            epochs: int = 10, batch_size: int = 64, optimizer: Union[str, Callable] = "adam", lr: float = 3e-3,
            momentum: float = 0.9, weight_decay: float = 0.0, grad_accum: int = 1, amp: str = "none",
            scheduler: str = "none", clip_grad_norm: Optional[float] = None, device="cpu",
            cache_teacher: bool = True, checkpoint_dir: Optional[str] = None, resume: bool = False,
            progress: bool = True, report_path: Optional[str] = None, print_table: bool = True) -> DistillResult:
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
        strategy_options (dict): ``name -> {option: value}`` for strategies given by name.
        eval_data (Dataset, optional): evaluated after every epoch.
        test_data (Dataset, optional): final accuracy (else ``eval_data``, else ``train_data``).
        seeds (list[int]): one run per seed and strategy.
        baseline (bool): also train the student without distillation.
        epochs, batch_size, lr, momentum, weight_decay, grad_accum, clip_grad_norm: Trainer settings.
        optimizer (str | callable): ``adam`` | ``adamw`` | ``sgd`` or ``params -> Optimizer``.
        amp (str): ``none`` | ``bf16`` | ``fp16`` (CUDA only) autocast.
        scheduler (str): ``none`` | ``cosine`` (annealed to 0 over the run).
        device (str): ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        cache_teacher (bool): compute the teacher's logits on the training set once
            instead of every step; needs fixed data (no random augmentation in
            ``train_data``).
        checkpoint_dir (str, optional): one resumable checkpoint per run here.
        resume (bool): continue each run from its checkpoint (finished runs are not
            retrained).
        progress (bool): tqdm bars.
        report_path (str, optional): where to write the JSON report.
        print_table (bool): print the results table (rank 0).

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
    if isinstance(seeds, int) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    strategies = _normalise_strategies(strategy, strategy_options, baseline)
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
    device = resolve_device(device)
    kw = _trainer_kwargs(epochs, batch_size, optimizer, lr, momentum, weight_decay, grad_accum, amp, scheduler,
                         clip_grad_norm, device, progress)

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
              "training": {"epochs": epochs, "batch_size": batch_size, "global_batch": batch_size * _world_size(),
                           "grad_accum": grad_accum, "optimizer": optimizer if isinstance(optimizer, str) else
                           repr(optimizer), "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler,
                           "amp": amp, "world_size": _world_size(), "cache_teacher": cache_teacher},
              "teacher": {"parameters": _n_params(teachers[0]),
                          "accuracy": evaluate_classifier(teachers[0], eval_split)["accuracy"]},
              "runs": {}}
    if len(teachers) > 1:
        report["teacher"]["all_accuracies"] = [evaluate_classifier(t, eval_split)["accuracy"] for t in teachers]
    result = DistillResult(report)

    def run(label: str, step_fn, data_for_seed):
        accs, val_accs = [], []
        result.students[label] = []
        for seed in seeds:
            model = _new_student(student, seed)
            ckpt = (os.path.join(checkpoint_dir, f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}_seed{seed}.pt")
                    if checkpoint_dir else None)
            history = _fit(model, data_for_seed(seed), seed=seed, step_fn=step_fn, eval_data=eval_data,
                           checkpoint_path=ckpt, resume=resume, **kw)
            accs.append(evaluate_classifier(model, eval_split)["accuracy"])
            if history and "accuracy" in history[-1]:
                val_accs.append(history[-1]["accuracy"])
            result.students[label].append(model)
        return accs, val_accs

    if baseline:
        accs, val_accs = run("baseline", None, lambda seed: train_data)
        report["runs"]["baseline"] = {"strategy": None, "options": {}, **_summary(accs), "val_accuracy": val_accs}
        report["student"] = {"parameters": _n_params(result.students["baseline"][0])}
    for label, s in strategies.items():
        def teacher_fn(x, s=s):
            return s.teacher_logits(teachers, x.to(device))

        # MUNGE labels its own (larger) set in prepare(); the others can reuse one pass of the teacher
        cache = cache_teacher and type(s).prepare is Strategy.prepare
        cached = _with_teacher_logits(train_data, teacher_fn) if cache else train_data
        accs, val_accs = run(label, s.step_fn(teacher_fn, cached=cache),
                             lambda seed, s=s, cached=cached, tf=teacher_fn: s.prepare(cached, tf, seed))
        entry = {"strategy": s.name, "options": s.options(), **_summary(accs), "val_accuracy": val_accs}
        if hasattr(s, "generator_used"):
            entry["generator_used"] = s.generator_used
        if s.name == "ensemble":
            entry["teacher_accuracy"] = _accuracy_of_logits(teacher_fn, eval_split)
        report["runs"][label] = entry
        report.setdefault("student", {"parameters": _n_params(result.students[label][0])})

    if _is_main():
        if report_path:
            os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
            with open(report_path + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(report_path + ".tmp", report_path)
        if print_table:
            print(format_table(report))
    return result


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
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    line = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
