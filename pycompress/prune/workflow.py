"""The prune -> fine-tune experiment: measurement (params, FLOPs, CPU latency, accuracy) and the
JSON/table report. The engine it drives (:func:`prune`, the schedules, :func:`induce_sparsity`,
:func:`choose_threshold`) lives in :mod:`pycompress.prune.pruner`; it is re-exported here.
"""

import copy
import json
import os
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from pycompress.config import PruneConfig, TrainConfig, from_dict, result_settings, to_dict
from pycompress.cost import compare_latency, measure_cost, measure_latency  # noqa: F401  (old import path)
from pycompress.cost import example_tuple
from pycompress.prune.criteria import Taylor
from pycompress.prune.pruner import objects_from_options
from pycompress.prune.tasks import Task, get_task
from pycompress.prune.pruner import choose_threshold, induce_sparsity, prune  # noqa: F401  (re-exported: the old home)
from pycompress.train import Trainer, atomic_save, load_file, resolve_device

__all__ = ["prune", "induce_sparsity", "choose_threshold", "measure_latency", "compare_latency", "run_experiment",
           "prune_experiment", "format_report"]


# ---------------------------------------------------------------------------- the experiment
def train_cosine(model: nn.Module, train_data, val_data, *, epochs: int, lr: float, batch_size: int = 32,
                 seed: int = 0, checkpoint_path: Optional[str] = None, progress: bool = False,
                 resume: bool = False) -> None:
    """Deprecated: ``Trainer(model, train_data, TrainConfig(..., scheduler="cosine"))`` (SGD, momentum 0.9,
    weight decay 1e-4, cosine over the run), which is what this did."""
    warnings.warn("pycompress.prune.workflow.train_cosine is deprecated; use Trainer with "
                  "TrainConfig(scheduler='cosine')", DeprecationWarning, stacklevel=2)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=1e-4, scheduler="cosine")
    Trainer(model, train_data, cfg, eval_data=val_data, seed=seed, checkpoint_path=checkpoint_path,
            progress=progress).fit(resume=resume)


def _stage(model, example_inputs, test_data, task) -> dict:
    return {**measure_cost(model, example_inputs).as_dict(),
            **(task.evaluate(model, test_data) if test_data is not None else {})}


# old run_experiment keyword -> (PruneConfig key path(s)); one name per concept from now on
_LEGACY = {"dense_epochs": ("dense.epochs",), "dense_lr": ("dense.lr",), "finetune_epochs": ("finetune.epochs",),
           "finetune_lr": ("finetune.lr",), "lr": ("finetune.lr",),
           "batch_size": ("dense.batch_size", "finetune.batch_size"), "ignored_layers": ("exclude",)}


def _prune_config(config: Optional[PruneConfig], options: dict) -> PruneConfig:
    data: dict = {}
    for key, value in options.items():
        if key == "seed":
            data["seeds"] = [value]
        elif key == "singh":
            data["singh"] = dict(value or {})
        elif key in ("checkpoint_dir", "output", "weights", "save") and value is None:
            data[key] = ""
        elif key in _LEGACY:
            if key in ("ignored_layers",):
                warnings.warn(f"run_experiment({key}=...) is deprecated; use exclude=", DeprecationWarning,
                              stacklevel=3)
            for path in _LEGACY[key]:
                head, _, leaf = path.partition(".")
                if leaf:
                    data.setdefault(head, {})[leaf] = value
                else:
                    data[head] = list(value)
        elif key in ("exclude", "latency_batch_sizes"):
            data[key] = list(value)
        else:
            data[key] = value
    return from_dict(config or PruneConfig(), data)


def run_experiment(model: nn.Module, example_inputs, train_data, val_data, test_data,
                   config: Optional[PruneConfig] = None, *, criterion=None,
                   model_factory: Optional[Callable[[], nn.Module]] = None, eval_data=None,
                   log: Optional[Callable[[str], None]] = None, task=None, **options) -> dict:
    """Dense training (optional) -> :func:`prune` -> fine-tuning, measured at each stage.

    Args:
        config (PruneConfig, optional): every setting, with the CLI's defaults; keyword
            ``options`` named like its fields replace them (``target_params=0.1``,
            ``dense={"epochs": 5}``). The older spellings ``dense_epochs``, ``dense_lr``,
            ``finetune_epochs``, ``finetune_lr``, ``batch_size``, ``seed`` and
            ``ignored_layers`` still work.
        criterion (str | Criterion, optional): overrides ``config.criterion``, e.g. a
            configured :class:`Taylor` instance.
        model_factory (callable): rebuilds the unpruned model, to reload a pruned
            checkpoint on resume.
        eval_data: the validation split (``val_data`` is the positional spelling).
        task (str | Task, optional): overrides ``config.task``: the loss of every training and
            scoring step and the quality measure (:mod:`pycompress.prune.tasks`; a detector's is
            its own criterion and AP50).

    With ``checkpoint_dir`` every phase checkpoints: ``dense.pt`` and
    ``finetune.pt`` (Trainer checkpoints) and ``pruned.pt`` (the pruned
    ``state_dict``); ``resume=True`` skips finished phases and continues
    interrupted ones (reloading the pruned model needs ``model_factory``).

    Returns:
        dict: ``{"config", "dense", "pruned", "fine_tuned", "history", "prune_seconds", "model"}``; each
        stage holds ``params``, ``macs``, ``flops`` (= 2 x MACs), the task's test metrics (``accuracy``; a detector's ``AP50``, ``AP``, ``AP75``) and the interleaved
        median CPU latencies (``batch{b}_ms``) of the dense and final models. With
        ``report_steps``, each history record also holds a ``stage`` of the model after that step
        (before the final fine-tuning): cost, test metrics, latency interleaved with the others.
    """
    from pycompress.prune.graph import load_pruned_state_dict

    cfg = _prune_config(config, options)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not isinstance(task, Task):
        task = get_task(cfg.task if task is None else task, model, **cfg.task_options)
    task.check(model)
    trainer_hooks = {"step_fn": task.loss_fn, "eval_fn": task.evaluate}
    val_data = eval_data if eval_data is not None else val_data
    seed = cfg.single_seed()
    log = log or print
    example_inputs = example_tuple(example_inputs)
    ck = (lambda name: os.path.join(cfg.checkpoint_dir, name)) if cfg.checkpoint_dir else (lambda name: None)
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    if cfg.dense.epochs:
        Trainer(model, train_data, cfg.dense, eval_data=val_data, seed=seed, device=device,
                checkpoint_path=ck("dense.pt"), progress=cfg.progress,
                run_config=result_settings(cfg, "dense", "finetune"), **trainer_hooks).fit(resume=cfg.resume)
    model.cpu()
    dense = _stage(model, example_inputs, test_data, task)
    log(f"dense: {dense}")
    history: list = []
    t0 = time.perf_counter()
    if cfg.resume and ck("pruned.pt") and os.path.exists(ck("pruned.pt")):
        if model_factory is None:
            raise ValueError("resume after pruning needs model_factory to rebuild the pruned model")
        saved = load_file(ck("pruned.pt"), "pruned checkpoint")
        pruned = load_pruned_state_dict(model_factory(), saved["state_dict"], example_inputs=example_inputs)
        history, phase_plan = saved["history"], saved.get("phase_plan")
        step_models = [load_pruned_state_dict(model_factory(), sd, example_inputs=example_inputs)
                       for sd in saved.get("step_state_dicts", [])]
    else:
        if criterion is None:
            criterion = Taylor(flops_lambda=cfg.flops_lambda) if cfg.criterion == "taylor" else cfg.criterion
        singh = getattr(criterion, "name", criterion) == "singh"  # a name or an instance: its options apply
        criterion, schedule, target = objects_from_options(
            criterion, target_params=cfg.target_params, target_flops=cfg.target_flops,
            channel_ratio=cfg.channel_ratio, steps=cfg.steps, units_per_step=cfg.units_per_step,
            per_layer=cfg.per_layer, round_to=cfg.round_to, max_layer_ratio=cfg.max_layer_ratio,
            batch_size=cfg.finetune.batch_size, score_batches=cfg.score_batches,
            fine_tune_steps=cfg.fine_tune_steps, lr=cfg.finetune.lr, momentum=cfg.finetune.momentum,
            weight_decay=cfg.finetune.weight_decay, seed=seed,
            singh=to_dict(cfg.singh) if singh else None)
        step_models = []
        keep_step = (lambda m, record: step_models.append(copy.deepcopy(m))) if cfg.report_steps else None
        pruned = prune(model, example_inputs, criterion, schedule, target, train_data=train_data,
                       val_data=val_data, ignored_layers=cfg.exclude, history=history, log=log,
                       loss_fn=task.loss_fn, eval_fn=task.evaluate, metric=task.metric, on_step=keep_step)
        phase_plan = getattr(schedule, "plan", None)
        for record, m in zip(history, step_models):
            record["stage"] = _stage(m, example_inputs, test_data, task)
            log(f"after step {record['step']}: {record['stage']}")
        if ck("pruned.pt"):
            atomic_save({"state_dict": pruned.state_dict(), "history": history, "phase_plan": phase_plan,
                         "step_state_dicts": [m.state_dict() for m in step_models]}, ck("pruned.pt"))
    prune_seconds = time.perf_counter() - t0
    after = _stage(pruned, example_inputs, test_data, task)
    log(f"pruned: {after}")
    final = copy.deepcopy(pruned)
    if cfg.finetune.epochs:
        Trainer(final, train_data, cfg.finetune, eval_data=val_data, seed=seed + 1, device=device,
                checkpoint_path=ck("finetune.pt"), progress=cfg.progress,
                run_config=result_settings(cfg, "finetune"), **trainer_hooks).fit(resume=cfg.resume)
        final.cpu()
    tuned = _stage(final, example_inputs, test_data, task)
    log(f"fine-tuned: {tuned}")
    shape = tuple(example_inputs[0].shape[1:])
    steps = {f"step {r['step']}": m for r, m in zip(history, step_models)}
    latency = compare_latency({"dense": model, **steps, "pruned": final}, shape, cfg.latency_batch_sizes)
    for stage, key in ((dense, "dense"), (after, "pruned"), (tuned, "pruned")):
        stage.update(latency[key])
    for record, key in zip(history, steps):
        record["stage"].update(latency[key])
    return {"config": to_dict(cfg), "task": task.name, "metric": task.metric, "phase_plan": phase_plan,
            "dense": dense, "pruned": after, "fine_tuned": tuned, "history": history,
            "prune_seconds": prune_seconds, "model": final}


def prune_experiment(cfg: PruneConfig) -> dict:
    """``pycompress prune``: builds the model and data ``cfg`` names, runs :func:`run_experiment`, prints the
    table, writes the report (``cfg.output``) and the pruned state_dict (``cfg.save``) atomically."""
    from pycompress.cli.common import atomic_write_json, build_model, load_data
    from pycompress.prune.graph import load_pruned_state_dict

    seed = cfg.single_seed()
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs, seed=seed)

    def factory():
        torch.manual_seed(seed)
        return build_model(cfg.model.model, cfg.model.kwargs, "model.model")

    model = factory()
    x = train[0][0].unsqueeze(0)
    if cfg.weights:  # dense, or pruned (an earlier run's --save): pruning then continues from it
        load_pruned_state_dict(model, load_file(cfg.weights, "weights file"), example_inputs=x)
    report = run_experiment(model, x, train, val, test, cfg, model_factory=factory)
    print(format_report(report))
    if cfg.output:
        atomic_write_json(report_dict(report), cfg.output)
    if cfg.save:
        atomic_save(report["model"].state_dict(), cfg.save)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of the report's stages: dense, each step (with ``report_steps``), pruned, fine-tuned."""
    from pycompress.cli.common import format_table

    dense = report["dense"]
    batch_sizes = [k[len("batch"):-len("_ms")] for k in dense if k.startswith("batch") and k.endswith("_ms")]
    metrics = [m for m in ("accuracy", "AP50", "AP") if m in dense] or ["accuracy"]
    rows = []
    stages = [("dense", dense)] + [(f"step {r['step']}", r["stage"]) for r in report.get("history", []) if "stage" in r]
    for key, s in stages + [("pruned", report["pruned"]), ("fine_tuned", report["fine_tuned"])]:
        rows.append([key, f"{s['params']} ({dense['params'] / s['params']:.1f}x)",
                     f"{s['macs']} ({dense['macs'] / s['macs']:.1f}x)", f"{s['flops']}"]
                    + [f"{100 * s[m]:.2f}%" if m in s else "-" for m in metrics]
                    + [f"{s[f'batch{b}_ms']:.3f}" for b in batch_sizes])
    head = ["stage", "params", "MACs", "FLOPs (2 MACs)"] + metrics + [f"latency b{b} ms" for b in batch_sizes]
    threads = dense.get("threads")
    plan = report.get("phase_plan")
    return (format_table(head, rows) + (f"\n(latency: median of interleaved runs, {threads} threads)" if threads else "")
            + ("".join(f"\nphase {i + 1}: {', '.join(p)}" for i, p in enumerate(plan)) if plan else ""))


def report_dict(report: dict) -> dict:
    """The report without the model object (what is written as JSON)."""
    return {k: v for k, v in report.items() if k != "model"}


def report_json(report: dict) -> str:
    """The report without the model object, as JSON."""
    return json.dumps(report_dict(report), indent=2)
