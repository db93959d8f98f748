"""The prune -> fine-tune workflow: one-shot, iterative (Molchanov) and phased (Singh) schedules,
plus measurement (params, FLOPs, CPU latency, accuracy) and the JSON/table report.
"""

import copy
import json
import math
import os
import time
import warnings
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn

from pycompress.config import PruneConfig, TrainConfig, from_dict, to_dict
from pycompress.cost import compare_latency, measure_cost, measure_latency  # noqa: F401  (old import path)
from pycompress.prune.criteria import Singh, Taylor, get_criterion
from pycompress.prune.graph import DependencyGraph, _as_tuple, count_params_flops
from pycompress.prune.schedule import group_key, plan_removal, select_units
from pycompress.train import Trainer, atomic_save, collate, cross_entropy_step, evaluate_classifier, resolve_device

__all__ = ["prune", "induce_sparsity", "choose_threshold", "measure_latency", "compare_latency", "run_experiment",
           "prune_experiment", "format_report"]


def _check_fraction(name, v, low_open=True):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if low_open else 0 <= v < 1):
        raise ValueError(f"{name} must be a fraction in {'(0, 1]' if low_open else '[0, 1)'}, got {v!r}")


def _score_batches(data, batch_size: int, n: int, seed: int) -> List[tuple]:
    """``n`` deterministic random minibatches of ``data`` (for data-driven criteria)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)
    out = []
    for b in range(n):
        idx = perm[(b * batch_size) % len(data):][:batch_size]
        if len(idx) == 0:
            break
        out.append(collate(data, idx.tolist()))
    return out


def _fine_tune(model, train_data, steps, *, batch_size, lr, momentum, weight_decay, seed, step_fn=None,
               eval_data=None):
    per_epoch = math.ceil(len(train_data) / batch_size)
    Trainer(model, train_data, step_fn=step_fn, epochs=math.ceil(steps / per_epoch), max_steps=steps,
            batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
            eval_data=eval_data, progress=False).fit()


def prune(model: nn.Module, example_inputs, criterion="taylor", *, target_params: Optional[float] = None,
          target_flops: Optional[float] = None, channel_ratio: Optional[float] = None, steps: int = 1,
          units_per_step: Optional[int] = None,
          per_layer: bool = False, ignored_layers: Iterable = (), round_to: int = 1, max_layer_ratio: float = 0.9,
          train_data=None, val_data=None, loss_fn: Optional[Callable] = None, batch_size: int = 32,
          score_batches: int = 8, fine_tune_steps: int = 0, lr: float = 0.01, momentum: float = 0.9,
          weight_decay: float = 1e-4, seed: int = 0, singh: Optional[dict] = None, inplace: bool = False,
          history: Optional[list] = None, log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """Structurally prunes ``model`` and returns a physically smaller ``nn.Module``.

    Schedules:
        - one-shot (``steps=1``): score once, remove the lowest-ranked units until
          the target is reached.
        - iterative (``steps > 1``, Molchanov et al. 2017): ``steps`` times, re-score
          on the current model, remove the lowest-ranked units down to an
          intermediate target (geometric between 1 and the final one), then
          fine-tune ``fine_tune_steps`` minibatches.
        - phased (``criterion="singh"``, Singh et al. 2019): the prunable groups
          are split front to back into ``singh["phases"]`` layer sets; per set,
          L1 sparsity induction, a threshold chosen on ``val_data``, filter
          selection from the sparsity of layers l and l+1, removal, retraining.
          Rounds repeat until the target is met or nothing more is flagged.

    Args:
        model (nn.Module): the (trained) model; copied unless ``inplace``.
        example_inputs (Tensor | tuple[Tensor]): inputs for tracing and counting.
        criterion (str | Criterion): ``l1``, ``l2``, ``bn_scale``, ``taylor``,
            ``taylor_weight``, ``singh``, ``random`` or an instance.
        target_params (float): keep this fraction of the dense parameter count.
        target_flops (float): keep this fraction of the dense FLOPs (MACs).
        channel_ratio (float): instead of a target, remove this fraction of every
            prunable group's channels (per-layer, one shot per step).
        steps (int): pruning iterations (see above).
        units_per_step (int, optional): the paper's form of the iterative schedule:
            remove this many lowest-ranked units per iteration (the paper: one
            feature map), fine-tune, re-score, until the target is reached
            (``steps`` is then ignored).
        per_layer (bool): rank within each group instead of globally.
        ignored_layers (iterable of nn.Module | str): layers never pruned.
        round_to (int): each group keeps a multiple of this many channels.
        max_layer_ratio (float): most a group may lose, as a fraction of its
            original channels.
        train_data (Dataset): minibatches for data-driven criteria and fine-tuning.
        val_data (Dataset): Singh's threshold selection.
        loss_fn (callable): ``loss_fn(model, batch) -> loss``; default cross-entropy.
        batch_size (int): minibatch size for scoring and fine-tuning.
        score_batches (int): minibatches per scoring round of data-driven criteria.
        fine_tune_steps (int): optimizer steps after each pruning step (0 = none).
        lr, momentum, weight_decay (float): SGD settings of fine-tuning (the paper:
            lr 1e-4 at its scale, momentum 0.9, weight decay 1e-4).
        seed (int): seeds scoring batches and fine-tuning.
        singh (dict): Singh options: ``phases`` (3), ``l1`` (1e-4), ``sparsity_steps``
            (100), ``rho`` (0.9), ``tolerance`` (0.01 accuracy), ``rounds`` (3),
            ``lr`` (``lr``).
        inplace (bool): prune ``model`` itself.
        history (list, optional): receives one dict per step (params, FLOPs, units).
        log (callable, optional): receives progress lines.

    Returns:
        nn.Module: the pruned model, same class as ``model``.

    Raises:
        ValueError: bad arguments, untraceable graph (naming the node), or a
            data-driven criterion without ``train_data``.

    Example:
        >>> small = prune(model, torch.randn(1, 1, 8, 8), "taylor", target_params=0.1, steps=10,
        ...               train_data=train_set, fine_tune_steps=30)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    if sum(v is not None for v in (target_params, target_flops, channel_ratio)) != 1:
        raise ValueError("give exactly one of target_params, target_flops and channel_ratio")
    _check_fraction("target_params", target_params)
    _check_fraction("target_flops", target_flops)
    _check_fraction("channel_ratio", channel_ratio, low_open=False)
    for name, v, lo in (("steps", steps, 1), ("round_to", round_to, 1), ("batch_size", batch_size, 1),
                        ("score_batches", score_batches, 1), ("fine_tune_steps", fine_tune_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    _check_fraction("max_layer_ratio", max_layer_ratio)
    if units_per_step is not None:
        if isinstance(units_per_step, bool) or not isinstance(units_per_step, int) or units_per_step < 1:
            raise ValueError(f"units_per_step must be None or an int >= 1, got {units_per_step!r}")
        if channel_ratio is not None:
            raise ValueError("units_per_step needs target_params or target_flops, not channel_ratio")
    if isinstance(criterion, str) and criterion == "singh":
        crit = Singh(rho=(singh or {}).get("rho", 0.9))
    else:
        crit = get_criterion(criterion)
    if crit.needs_data and train_data is None:
        raise ValueError(f"criterion {crit.name!r} needs train_data (minibatches to score on)")
    if fine_tune_steps and train_data is None:
        raise ValueError("fine_tune_steps > 0 needs train_data")
    names = {m: n for n, m in model.named_modules()}
    ignored = [names.get(l, l) if isinstance(l, nn.Module) else l for l in ignored_layers]
    for l in ignored:
        if not isinstance(l, str):
            raise ValueError("ignored_layers must hold submodules of model or their names")
    if not inplace:
        model = copy.deepcopy(model)
    log = log or (lambda s: None)
    history = history if history is not None else []
    graph = DependencyGraph(model, example_inputs, ignored)
    dense_params, dense_flops = graph.cost()
    original_sizes = {group_key(g): len(g) for g in graph.groups}
    tune = dict(batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, step_fn=loss_fn)
    caps = dict(per_layer=per_layer, round_to=round_to, max_layer_ratio=max_layer_ratio,
                original_sizes=original_sizes)
    if isinstance(crit, Singh):
        return _singh_schedule(model, example_inputs, crit, ignored, train_data, val_data, loss_fn,
                               target_params, target_flops, dense_params, dense_flops, caps, tune,
                               fine_tune_steps, seed, dict(singh or {}), history, log)
    step = 0
    while units_per_step is not None or step < steps:
        step += 1
        graph = DependencyGraph(model, example_inputs, ignored) if step > 1 else graph
        data = (_score_batches(train_data, batch_size, score_batches, seed + step) if crit.needs_data else None)
        scores = crit.scores(graph, data, loss_fn)
        if channel_ratio is not None:
            frac = 1 - (1 - channel_ratio) ** (step / steps)
            units = []
            for gi in scores:  # the same fraction of every scorable group
                g = graph.groups[gi]
                n = int(round(frac * original_sizes[group_key(g)])) - (original_sizes[group_key(g)] - len(g))
                units += select_units(graph, {gi: scores[gi]}, max(0, n), **caps)
            reached = True
        else:
            frac = (target_params or target_flops) ** (1 if units_per_step else step / steps)
            units, reached = plan_removal(
                graph, scores, target_params=None if target_params is None else int(frac * dense_params),
                target_flops=None if target_flops is None else int(frac * dense_flops), **caps)
            if units_per_step is not None and len(units) > units_per_step:
                units, reached = select_units(graph, scores, units_per_step, **caps), False
        if not units and not (reached and units_per_step is None):
            log(f"prune step {step}: nothing left to remove under the caps; stopping short of the target")
            break
        graph.remove(units)
        params, flops = count_params_flops(model, example_inputs)
        record = {"step": step, "removed_units": len(units), "params": params, "flops": flops,
                  "target_reached": reached}
        if fine_tune_steps:
            _fine_tune(model, train_data, fine_tune_steps, seed=seed + step, **tune)
        if val_data is not None:
            record["val_accuracy"] = evaluate_classifier(model, val_data)["accuracy"]
        history.append(record)
        log(f"prune step {step}{'' if units_per_step else f'/{steps}'}: -{len(units)} channels, params {params} "
            f"({dense_params / params:.2f}x), FLOPs {flops} ({dense_flops / flops:.2f}x)"
            f"{'' if reached or units_per_step else ' (caps stop short of the target)'}")
        if units_per_step is not None and reached:
            break
    return model


# ---------------------------------------------------------------------------- Singh et al. 2019
def _producer_weights(graph: DependencyGraph, groups) -> List[nn.Parameter]:
    mods = graph.modules()
    seen, out = set(), []
    for g in groups:
        for m in g.members:
            if m.kind in ("out", "dw") and m.module not in seen:
                seen.add(m.module)
                out.append(mods[m.module].weight)
    return out


def induce_sparsity(model: nn.Module, weights: Sequence[nn.Parameter], train_data, *, l1: float, steps: int,
                    batch_size: int = 32, lr: float = 0.01, seed: int = 0, loss_fn=None):
    r"""Singh step 1: trains with :math:`L + \lambda \sum_{W \in \mathcal{L}} \|W\|_1` for ``steps`` minibatches."""
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    base = loss_fn or cross_entropy_step
    ids = {id(w) for w in weights}

    def step_fn(m, batch):
        penalty = sum(p.abs().sum() for p in m.parameters() if id(p) in ids)
        return base(m, batch) + l1 * penalty

    _fine_tune(model, train_data, steps, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=0.0, seed=seed,
               step_fn=step_fn)


@torch.no_grad()
def choose_threshold(model: nn.Module, weights: Sequence[nn.Parameter], val_data, *, tolerance: float = 0.01,
                     multipliers: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)) -> float:
    r"""Singh step 1b: zero every weight with :math:`|w| < a \cdot \overline{|W|}` (per layer).

    ``a`` is the largest multiplier whose validation accuracy stays within
    ``tolerance`` of the accuracy before thresholding. The chosen zeroing is
    applied to ``weights`` in place; returns ``a`` (0.0 if none qualifies).
    """
    if val_data is None:
        raise ValueError("singh needs val_data to choose the sparsity threshold")
    base = evaluate_classifier(model, val_data)["accuracy"]
    saved = [w.detach().clone() for w in weights]
    best = 0.0
    for a in sorted(multipliers):
        for w, s in zip(weights, saved):
            w.copy_(torch.where(s.abs() < a * s.abs().mean(), torch.zeros_like(s), s))
        if evaluate_classifier(model, val_data)["accuracy"] >= base - tolerance:
            best = a
    for w, s in zip(weights, saved):
        w.copy_(torch.where(s.abs() < best * s.abs().mean(), torch.zeros_like(s), s))
    return best


def _singh_flagged_units(graph, crit: Singh, layer_set, which: int, target: int, caps):
    """The units of ``layer_set``'s groups that Singh flags as mostly zero, at most as many
    as the target needs; returns (units, number flagged)."""
    scores = crit.scores(graph)
    gis = {gi for gi, g in enumerate(graph.groups) if group_key(g) in layer_set and gi in scores}
    flagged = crit.unimportant({gi: scores[gi] for gi in gis})
    # only flagged units may go: the others get an infinite score and are filtered out
    masked = {}
    for gi in gis:
        s = torch.full_like(scores[gi], math.inf)
        s[flagged[gi]] = scores[gi][flagged[gi]]
        masked[gi] = s
    n_flagged = sum(len(v) for v in flagged.values())
    units = select_units(graph, masked, n_flagged, **caps)
    if graph.cost(units)[which] < target:  # do not overshoot: fewest flagged units meeting the target
        units, _ = plan_removal(graph, masked, **{("target_params" if which == 0 else "target_flops"): target},
                                **caps)
        units = [u for u in units if any(u == graph.groups[gi].units[p] for gi in gis
                                         for p in flagged[gi].tolist())]
    return units, n_flagged


def _singh_schedule(model, example_inputs, crit: Singh, ignored, train_data, val_data, loss_fn, target_params,
                    target_flops, dense_params, dense_flops, caps, tune, fine_tune_steps, seed, opts, history, log):
    if train_data is None or val_data is None:
        raise ValueError("criterion 'singh' needs train_data (sparsity induction) and val_data (threshold)")
    allowed = {"phases", "l1", "sparsity_steps", "rho", "tolerance", "rounds", "lr"}
    if set(opts) - allowed:
        raise ValueError(f"singh options must be among {sorted(allowed)}, got {sorted(set(opts) - allowed)}")
    phases, l1 = opts.get("phases", 3), opts.get("l1", 1e-4)
    sparsity_steps, tol = opts.get("sparsity_steps", 100), opts.get("tolerance", 0.01)
    rounds, s_lr = opts.get("rounds", 3), opts.get("lr", tune["lr"])
    target_p = None if target_params is None else int(target_params * dense_params)
    target_f = None if target_flops is None else int(target_flops * dense_flops)
    which, target = (0, target_p) if target_p is not None else (1, target_f)
    step = 0
    for rnd in range(rounds):
        graph = DependencyGraph(model, example_inputs, ignored)
        keys = [group_key(g) for g in graph.prunable_groups()]
        sets = [keys[i * len(keys) // phases:(i + 1) * len(keys) // phases] for i in range(phases)]
        removed_this_round = 0
        for layer_set in sets:
            if not layer_set:
                continue
            step += 1
            graph = DependencyGraph(model, example_inputs, ignored)
            groups = [g for g in graph.groups if group_key(g) in layer_set]
            weights = _producer_weights(graph, groups)
            induce_sparsity(model, weights, train_data, l1=l1, steps=sparsity_steps, batch_size=tune["batch_size"],
                            lr=s_lr, seed=seed + step, loss_fn=loss_fn)
            a = choose_threshold(model, weights, val_data, tolerance=tol)
            units, n_flagged = [], 0
            if a > 0:  # a = 0: every threshold cost accuracy, so this phase zeroes and prunes nothing
                units, n_flagged = _singh_flagged_units(graph, crit, layer_set, which, target, caps)
            if units:
                graph.remove(units)
            removed_this_round += len(units)
            if fine_tune_steps:
                _fine_tune(model, train_data, fine_tune_steps, seed=seed + 1000 + step, **tune)
            params, flops = count_params_flops(model, example_inputs)
            history.append({"step": step, "round": rnd + 1, "layers": [k[0] for k in layer_set],
                            "threshold_multiplier": a, "flagged": n_flagged, "removed_units": len(units),
                            "params": params, "flops": flops,
                            "val_accuracy": evaluate_classifier(model, val_data)["accuracy"]})
            log(f"singh round {rnd + 1} phase {step}: threshold {a} x mean|w|, {n_flagged} flagged, "
                f"-{len(units)} channels, params {params} ({dense_params / params:.2f}x), "
                f"FLOPs {flops} ({dense_flops / flops:.2f}x), val accuracy {history[-1]['val_accuracy']:.4f}")
            if (params, flops)[which] <= target:
                return model
        if removed_this_round == 0:
            break
    log("singh: the target was not reached within the rounds allowed")
    return model


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


def _stage(model, example_inputs, test_data) -> dict:
    return {**measure_cost(model, example_inputs).as_dict(),
            **({"accuracy": evaluate_classifier(model, test_data)["accuracy"]} if test_data is not None else {})}


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
                   log: Optional[Callable[[str], None]] = None, **options) -> dict:
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

    With ``checkpoint_dir`` every phase checkpoints: ``dense.pt`` and
    ``finetune.pt`` (Trainer checkpoints) and ``pruned.pt`` (the pruned
    ``state_dict``); ``resume=True`` skips finished phases and continues
    interrupted ones (reloading the pruned model needs ``model_factory``).

    Returns:
        dict: ``{"config", "dense", "pruned", "fine_tuned", "history", "prune_seconds", "model"}``; each
        stage holds ``params``, ``macs``, ``flops`` (= 2 x MACs), test ``accuracy`` and the interleaved
        median CPU latencies (``batch{b}_ms``) of the dense and final models.
    """
    from pycompress.prune.graph import load_pruned_state_dict

    cfg = _prune_config(config, options)
    val_data = eval_data if eval_data is not None else val_data
    seed = cfg.single_seed()
    log = log or print
    example_inputs = _as_tuple(example_inputs)
    ck = (lambda name: os.path.join(cfg.checkpoint_dir, name)) if cfg.checkpoint_dir else (lambda name: None)
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    if cfg.dense.epochs:
        Trainer(model, train_data, cfg.dense, eval_data=val_data, seed=seed, device=device,
                checkpoint_path=ck("dense.pt"), progress=cfg.progress).fit(resume=cfg.resume)
    model.cpu()
    dense = _stage(model, example_inputs, test_data)
    log(f"dense: {dense}")
    history: list = []
    t0 = time.perf_counter()
    if cfg.resume and ck("pruned.pt") and os.path.exists(ck("pruned.pt")):
        if model_factory is None:
            raise ValueError("resume after pruning needs model_factory to rebuild the pruned model")
        saved = torch.load(ck("pruned.pt"), weights_only=True)
        pruned = load_pruned_state_dict(model_factory(), saved["state_dict"])
        history = saved["history"]
    else:
        if criterion is None:
            criterion = Taylor(flops_lambda=cfg.flops_lambda) if cfg.criterion == "taylor" else cfg.criterion
        pruned = prune(model, example_inputs, criterion, target_params=cfg.target_params,
                       target_flops=cfg.target_flops, channel_ratio=cfg.channel_ratio, steps=cfg.steps,
                       units_per_step=cfg.units_per_step, per_layer=cfg.per_layer, ignored_layers=cfg.exclude,
                       round_to=cfg.round_to, max_layer_ratio=cfg.max_layer_ratio, train_data=train_data,
                       val_data=val_data, batch_size=cfg.finetune.batch_size, score_batches=cfg.score_batches,
                       fine_tune_steps=cfg.fine_tune_steps, lr=cfg.finetune.lr, momentum=cfg.finetune.momentum,
                       weight_decay=cfg.finetune.weight_decay, seed=seed,
                       singh=to_dict(cfg.singh) if cfg.criterion == "singh" else None, history=history, log=log)
        if ck("pruned.pt"):
            atomic_save({"state_dict": pruned.state_dict(), "history": history}, ck("pruned.pt"))
    prune_seconds = time.perf_counter() - t0
    after = _stage(pruned, example_inputs, test_data)
    log(f"pruned: {after}")
    final = copy.deepcopy(pruned)
    if cfg.finetune.epochs:
        Trainer(final, train_data, cfg.finetune, eval_data=val_data, seed=seed + 1, device=device,
                checkpoint_path=ck("finetune.pt"), progress=cfg.progress).fit(resume=cfg.resume)
        final.cpu()
    tuned = _stage(final, example_inputs, test_data)
    log(f"fine-tuned: {tuned}")
    shape = tuple(example_inputs[0].shape[1:])
    latency = compare_latency({"dense": model, "pruned": final}, shape, cfg.latency_batch_sizes)
    for stage, key in ((dense, "dense"), (after, "pruned"), (tuned, "pruned")):
        stage.update(latency[key])
    return {"config": to_dict(cfg), "dense": dense, "pruned": after, "fine_tuned": tuned, "history": history,
            "prune_seconds": prune_seconds, "model": final}


def prune_experiment(cfg: PruneConfig) -> dict:
    """``pycompress prune``: builds the model and data ``cfg`` names, runs :func:`run_experiment`, prints the
    table, writes the report (``cfg.output``) and the pruned state_dict (``cfg.save``) atomically."""
    from pycompress.cli.common import atomic_write_json, build_model, load_data

    seed = cfg.single_seed()
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs, seed=seed)

    def factory():
        torch.manual_seed(seed)
        return build_model(cfg.model.model, cfg.model.kwargs, "model.model")

    model = factory()
    if cfg.weights:
        model.load_state_dict(torch.load(cfg.weights, weights_only=True))
    report = run_experiment(model, train[0][0].unsqueeze(0), train, val, test, cfg, model_factory=factory)
    print(format_report(report))
    if cfg.output:
        atomic_write_json(report_dict(report), cfg.output)
    if cfg.save:
        atomic_save(report["model"].state_dict(), cfg.save)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of the report's three stages."""
    from pycompress.cli.common import format_table

    dense = report["dense"]
    batch_sizes = [k[len("batch"):-len("_ms")] for k in dense if k.startswith("batch") and k.endswith("_ms")]
    rows = []
    for key in ("dense", "pruned", "fine_tuned"):
        s = report[key]
        rows.append([key, f"{s['params']} ({dense['params'] / s['params']:.1f}x)",
                     f"{s['macs']} ({dense['macs'] / s['macs']:.1f}x)", f"{s['flops']}",
                     f"{100 * s['accuracy']:.2f}%" if "accuracy" in s else "-"]
                    + [f"{s[f'batch{b}_ms']:.3f}" for b in batch_sizes])
    head = ["stage", "params", "MACs", "FLOPs (2 MACs)", "accuracy"] + [f"latency b{b} ms" for b in batch_sizes]
    threads = dense.get("threads")
    return format_table(head, rows) + (f"\n(latency: median of interleaved runs, {threads} threads)"
                                       if threads else "")


def report_dict(report: dict) -> dict:
    """The report without the model object (what is written as JSON)."""
    return {k: v for k, v in report.items() if k != "model"}


def report_json(report: dict) -> str:
    """The report without the model object, as JSON."""
    return json.dumps(report_dict(report), indent=2)
