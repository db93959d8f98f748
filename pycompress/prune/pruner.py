"""The pruning engine's driver: a :class:`Target`, a schedule and a criterion, run by a :class:`Pruner`.

- :class:`Target`: how small (a parameter, MAC or per-group channel fraction) and the
  per-layer constraints on getting there (``round_to``, ``max_layer_ratio``, ``per_layer``).
- Schedules (objects with their own options): :class:`OneShot`, :class:`Iterative`
  (Molchanov et al. 2017) and :class:`Phased` (Singh et al. 2019). A schedule is a
  generator of steps over a :class:`Pruner`; it never looks at the criterion's name.
- :class:`Pruner`: owns the model, the graph and the history; :meth:`Pruner.step` runs one
  step of the schedule, :meth:`Pruner.run` all of them.
- :func:`prune`: the one-call form, returning a pruned copy.
"""

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from pycompress.prune.criteria import Criterion, get_criterion
from pycompress.cost import example_tuple
from pycompress.prune.graph import DependencyGraph, count_params_flops
from pycompress.prune.schedule import group_key, plan_removal, select_units
from pycompress.train import Trainer, cross_entropy_step, evaluate_classifier

__all__ = ["Target", "FineTune", "Schedule", "OneShot", "Iterative", "Phased", "Pruner", "prune",
           "induce_sparsity", "choose_threshold"]


def _check_fraction(name, v, low_open=True):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if low_open else 0 <= v < 1):
        raise ValueError(f"{name} must be a fraction in {'(0, 1]' if low_open else '[0, 1)'}, got {v!r}")


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


@dataclass(frozen=True)
class Target:
    """How small the pruned model must be, and how each layer may get there.

    Args:
        params (float): keep this fraction of the dense parameter count.
        macs (float): keep this fraction of the dense multiply-accumulates.
        channels (float): instead, remove this fraction of every prunable group's channels.
        per_layer (bool): rank within each group instead of globally.
        round_to (int): each group keeps a multiple of this many channels.
        max_layer_ratio (float): most a group may lose, as a fraction of its original channels.
    """

    params: Optional[float] = None
    macs: Optional[float] = None
    channels: Optional[float] = None
    per_layer: bool = False
    round_to: int = 1
    max_layer_ratio: float = 0.9

    def __post_init__(self):
        if sum(v is not None for v in (self.params, self.macs, self.channels)) != 1:
            raise ValueError("Target: give exactly one of params, macs and channels")
        _check_fraction("Target.params", self.params)
        _check_fraction("Target.macs", self.macs)
        _check_fraction("Target.channels", self.channels, low_open=False)
        _check_int("Target.round_to", self.round_to, 1)
        _check_fraction("Target.max_layer_ratio", self.max_layer_ratio)

    @property
    def fraction(self) -> float:
        """The params or MACs fraction to keep (None for a channel target)."""
        return self.params if self.params is not None else self.macs

    def caps(self, original_sizes) -> dict:
        return dict(per_layer=self.per_layer, round_to=self.round_to, max_layer_ratio=self.max_layer_ratio,
                    original_sizes=original_sizes)


@dataclass(frozen=True)
class FineTune:
    """Minibatch settings of the fine-tuning between steps (SGD); ``batch_size`` is also the size of
    the scoring and sparsity-induction minibatches. ``steps=0``: no fine-tuning."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        _check_int("fine_tune_steps", self.steps, 0)
        _check_int("batch_size", self.batch_size, 1)


class Schedule:
    """A pruning schedule: :meth:`run` yields one history record (a dict) per step."""

    def check(self, pruner: "Pruner") -> None:
        """Raises ValueError when the pruner lacks what this schedule needs (data, a target kind)."""
        if self.fine_tune.steps and pruner.train_data is None:
            raise ValueError("fine_tune_steps > 0 needs train_data")

    def run(self, pruner: "Pruner") -> Iterator[dict]:
        raise NotImplementedError


class Iterative(Schedule):
    """Score, remove, fine-tune, ``steps`` times (Molchanov et al. 2017).

    Each step re-scores the current model and removes the lowest-ranked units down to an
    intermediate target, geometric between 1 and the final fraction, then fine-tunes. With
    ``units_per_step`` (the paper's form) each step removes at most that many units and the
    steps go on until the target is reached.

    Args:
        steps (int): pruning steps (ignored with ``units_per_step``).
        units_per_step (int, optional): units removed per step.
        score_batches (int): minibatches per scoring round of data-driven criteria.
        fine_tune (FineTune): fine-tuning after each step.
        seed (int): seeds the scoring minibatches and fine-tuning.
    """

    def __init__(self, steps: int = 1, *, units_per_step: Optional[int] = None, score_batches: int = 8,
                 fine_tune: FineTune = FineTune(), seed: int = 0):
        _check_int("steps", steps, 1)
        _check_int("score_batches", score_batches, 1)
        if units_per_step is not None:
            _check_int("units_per_step", units_per_step, 1)
        if not isinstance(fine_tune, FineTune):
            raise TypeError(f"fine_tune must be a FineTune, got {type(fine_tune).__name__}")
        self.steps, self.units_per_step, self.score_batches = steps, units_per_step, score_batches
        self.fine_tune, self.seed = fine_tune, seed

    def check(self, pruner):
        super().check(pruner)
        if self.units_per_step is not None and pruner.target.channels is not None:
            raise ValueError("units_per_step needs a params or MACs target (target_params or target_flops), "
                             "not a channel ratio")

    def _plan(self, pruner, graph, scores, step):
        target, caps = pruner.target, pruner.caps
        if target.channels is not None:
            frac = 1 - (1 - target.channels) ** (step / self.steps)
            units = []
            for gi in scores:  # the same fraction of every scorable group
                original = pruner.original_sizes[group_key(graph.groups[gi])]
                n = int(round(frac * original)) - (original - len(graph.groups[gi]))
                units += select_units(graph, {gi: scores[gi]}, max(0, n), **caps)
            return units, True
        frac = target.fraction ** (1 if self.units_per_step else step / self.steps)
        units, reached = plan_removal(graph, scores, **pruner.absolute_target(frac), **caps)
        if self.units_per_step is not None and len(units) > self.units_per_step:
            units, reached = select_units(graph, scores, self.units_per_step, **caps), False
        return units, reached

    def run(self, pruner):
        step = 0
        while self.units_per_step is not None or step < self.steps:
            step += 1
            graph = pruner.trace()
            scores = pruner.scores(graph, self.score_batches, self.fine_tune.batch_size, self.seed + step)
            units, reached = self._plan(pruner, graph, scores, step)
            if not units and not (reached and self.units_per_step is None):
                pruner.log(f"prune step {step}: nothing left to remove under the caps; stopping short of the target")
                return
            graph.remove(units)
            params, flops = count_params_flops(pruner.model, pruner.example_inputs)
            record = {"step": step, "removed_units": len(units), "params": params, "flops": flops,
                      "target_reached": reached}
            pruner.fine_tune(self.fine_tune, self.fine_tune.steps, self.seed + step)
            if pruner.val_data is not None:
                record.update(pruner.validate(pruner.model))
            pruner.log(f"prune step {step}{'' if self.units_per_step else f'/{self.steps}'}: -{len(units)} "
                       f"channels, params {params} ({pruner.dense_params / params:.2f}x), FLOPs {flops} "
                       f"({pruner.dense_flops / flops:.2f}x)"
                       f"{'' if reached or self.units_per_step else ' (caps stop short of the target)'}")
            yield record
            if self.units_per_step is not None and reached:
                return


class OneShot(Iterative):
    """Score once, remove the lowest-ranked units until the target is reached (then fine-tune)."""

    def __init__(self, *, score_batches: int = 8, fine_tune: FineTune = FineTune(), seed: int = 0):
        super().__init__(1, score_batches=score_batches, fine_tune=fine_tune, seed=seed)


# ---------------------------------------------------------------------------- Singh et al. 2019
def _fine_tune(model, train_data, steps, *, batch_size, lr, momentum, weight_decay, seed, step_fn=None):
    per_epoch = math.ceil(len(train_data) / batch_size)
    Trainer(model, train_data, step_fn=step_fn, epochs=math.ceil(steps / per_epoch), max_steps=steps,
            batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
            progress=False).fit()


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


# 0.25 to 4 x mean|w| in steps of 2 ** (1/4): fine enough that one step does not flip a whole layer
THRESHOLD_MULTIPLIERS = tuple(0.25 * 2 ** (k / 4) for k in range(17))


@torch.no_grad()
def choose_threshold(model: nn.Module, weights: Sequence[nn.Parameter], val_data, *, tolerance: float = 0.01,
                     multipliers: Sequence[float] = THRESHOLD_MULTIPLIERS, eval_fn: Optional[Callable] = None,
                     metric: str = "accuracy", candidate: Optional[Callable[[nn.Module], nn.Module]] = None,
                     reference: Optional[nn.Module] = None, log: Optional[Callable[[str], None]] = None) -> float:
    r"""Singh step 1b: zero every weight with :math:`|w| < a \cdot \overline{|W|}` (per layer).

    ``a`` is the largest multiplier whose validation ``metric`` (of ``eval_fn(model, val_data)``,
    default :func:`~pycompress.train.evaluate_classifier`'s accuracy; a detector's AP50) stays
    within ``tolerance`` of its value before thresholding. With ``candidate``, what is validated is
    ``candidate(thresholded model)``: for Singh, a copy with the units the threshold flags removed
    (and, with ``recovery_steps``, briefly retrained), so the tolerance bounds the cost of the pruning
    itself, not only of the zeroing. ``reference`` (default ``model``) is what the tolerance is
    measured from: for candidates that retrain, the model given the same steps with nothing removed.
    Quality is taken to fall as the threshold grows, so the multipliers are bisected (about log2(n)
    evaluations) rather than all tried: a noisy pass far above a failure is not taken. The chosen
    zeroing is applied to ``weights`` in place; returns ``a`` (0.0 if none qualifies).
    """
    if val_data is None:
        raise ValueError("singh needs val_data to choose the sparsity threshold")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    multipliers = sorted(multipliers)
    if not multipliers or any(not a > 0 for a in multipliers):
        raise ValueError(f"multipliers must be a non-empty sequence of positive numbers, got {multipliers!r}")
    eval_fn = eval_fn or evaluate_classifier
    candidate = candidate or (lambda m: m)
    base = eval_fn(model if reference is None else reference, val_data)[metric]
    saved = [w.detach().clone() for w in weights]

    def apply(a):
        for w, s in zip(weights, saved):
            w.copy_(torch.where(s.abs() < a * s.abs().mean(), torch.zeros_like(s), s))

    passing, failing = -1, len(multipliers)  # index of the largest known pass / the smallest known failure
    while failing - passing > 1:
        mid = (passing + failing) // 2
        apply(multipliers[mid])
        quality = eval_fn(candidate(model), val_data)[metric]
        if quality >= base - tolerance:
            passing = mid
        else:
            failing = mid
        if log is not None:
            log(f"threshold {multipliers[mid]:.3g} x mean|w|: val {metric} {quality:.4f} (before {base:.4f}, "
                f"{'pass' if passing == mid else 'fail'})")
    best = multipliers[passing] if passing >= 0 else 0.0
    apply(best)
    return best


def _phase_weights(graph: DependencyGraph, groups) -> List[nn.Parameter]:
    """The weights Singh's statistics read for ``groups``: of the layers producing their units (layer l,
    ``out``/``dw``) and of the prunable layers reading them (layer l+1, ``in``), each once. A reader
    whose outputs are all locked (a detection head) is left alone: its weights are not spread like a
    batch-normed conv's, so a threshold relative to their mean would zero whole classes."""
    mods = graph.modules()
    producers = {m.module for g in graph.prunable_groups() for m in g.members if m.kind in ("out", "dw")}
    seen, out = set(), []
    for g in groups:
        for m in g.members:
            weight = getattr(mods[m.module], "weight", None)
            wanted = m.kind in ("out", "dw") or (m.kind == "in" and m.module in producers)
            if wanted and isinstance(weight, nn.Parameter) and id(weight) not in seen:
                seen.add(id(weight))
                out.append(weight)
    return out


class Phased(Schedule):
    """Singh et al. 2019: the prunable groups are split front to back into ``phases`` layer sets;
    per set, L1 sparsity induction, a threshold chosen on ``val_data``, the criterion's
    ``unimportant`` units (mostly zero) removed, fine-tuning. Rounds repeat until the target is
    met or nothing more is flagged.

    Args:
        phases (int): layer sets per round.
        l1 (float): the L1 coefficient λ of sparsity induction.
        sparsity_steps (int): minibatches of sparsity induction per phase.
        tolerance (float): accuracy the threshold may cost on ``val_data``.
        rounds (int): passes over the layer sets.
        recovery_steps (int): SGD minibatches (the fine-tuning settings) that each threshold's
            candidate trains before it is validated. Removing channels without retraining is a cliff
            (a map feeding a head loses the channels it needs and the head goes silent) that a few
            steps undo; the paper retrains after pruning, and this lets the threshold see that.
            0: the candidate is validated as removed.
        phase_layers (list of lists of str, optional): the layer sets themselves, front to back: a
            group joins the first set with a pattern (fnmatch) matching one of its producing layers;
            groups matching none are not pruned. Default: ``phases`` equal slices in graph order.
        sparsity_lr (float, optional): SGD learning rate of sparsity induction (default: ``fine_tune.lr``).
        fine_tune (FineTune): fine-tuning after each phase.
        seed (int): seeds sparsity induction and fine-tuning.
    """

    def __init__(self, phases: int = 3, *, l1: float = 1e-4, sparsity_steps: int = 100, tolerance: float = 0.01,
                 rounds: int = 3, sparsity_lr: Optional[float] = None, fine_tune: FineTune = FineTune(),
                 seed: int = 0, phase_layers: Optional[Sequence[Sequence[str]]] = None, recovery_steps: int = 0):
        for name, v in (("phases", phases), ("sparsity_steps", sparsity_steps), ("rounds", rounds)):
            _check_int(name, v, 1)
        _check_int("recovery_steps", recovery_steps, 0)
        if not isinstance(fine_tune, FineTune):
            raise TypeError(f"fine_tune must be a FineTune, got {type(fine_tune).__name__}")
        self.phases, self.l1, self.sparsity_steps, self.tolerance = phases, l1, sparsity_steps, tolerance
        self.rounds, self.fine_tune, self.seed, self.recovery_steps = rounds, fine_tune, seed, recovery_steps
        if phase_layers is not None and (not phase_layers or any(isinstance(p, str) or not p for p in phase_layers)):
            raise ValueError(f"phase_layers must be a non-empty list of non-empty lists of layer patterns, got "
                             f"{phase_layers!r}")
        self.phase_layers = [list(p) for p in phase_layers] if phase_layers is not None else None
        self.plan: List[List[str]] = []   # the producing layers of each set, once run
        self.sparsity_lr = fine_tune.lr if sparsity_lr is None else sparsity_lr

    def check(self, pruner):
        super().check(pruner)
        if pruner.train_data is None or pruner.val_data is None:
            raise ValueError("the phased (Singh) schedule needs train_data (sparsity induction) and val_data "
                             "(threshold)")
        if not callable(getattr(pruner.criterion, "unimportant", None)):
            raise TypeError(f"the phased schedule needs a criterion that flags unimportant units (Singh), got "
                            f"{pruner.criterion!r}")
        if pruner.target.channels is not None:
            raise ValueError("the phased schedule needs a params or MACs target")

    def _layer_sets(self, groups) -> List[List[tuple]]:
        """The group keys of each phase, front to back."""
        if self.phase_layers is None:
            keys = [group_key(g) for g in groups]
            return [keys[i * len(keys) // self.phases:(i + 1) * len(keys) // self.phases] for i in range(self.phases)]
        sets: List[List[tuple]] = [[] for _ in self.phase_layers]
        for g in groups:
            producers = [m.module for m in g.members if m.kind in ("out", "dw")]
            phase = next((i for i, pats in enumerate(self.phase_layers)
                          if any(fnmatch.fnmatchcase(p, pat) for p in producers for pat in pats)), None)
            if phase is not None:
                sets[phase].append(group_key(g))
        return sets

    def _flagged_units(self, pruner, graph, layer_set, which, target):
        """The units of ``layer_set``'s groups that the criterion flags as unimportant, at most as
        many as the target needs; returns (units, number flagged)."""
        crit, caps = pruner.criterion, pruner.caps
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

    def run(self, pruner):
        absolute = pruner.absolute_target(pruner.target.fraction)
        which = 0 if absolute["target_params"] is not None else 1
        target = absolute["target_params"] if which == 0 else absolute["target_flops"]
        model, tune = pruner.model, self.fine_tune
        step = 0
        for rnd in range(self.rounds):
            sets = self._layer_sets(pruner.trace().prunable_groups())
            if rnd == 0:
                self.plan = [list(dict.fromkeys(k.rsplit(".", 1)[0] for key in layer_set for k in key
                                                if k.endswith((".out", ".dw")))) for layer_set in sets]
                pruner.log("singh phase plan (front to back): " + "; ".join(
                    f"phase {i + 1}: {', '.join(p) or '-'}" for i, p in enumerate(self.plan)))
            removed_this_round = 0
            for layer_set in sets:
                if not layer_set:
                    continue
                step += 1
                graph = pruner.trace()
                weights = _phase_weights(graph, [g for g in graph.groups if group_key(g) in layer_set])
                induce_sparsity(model, weights, pruner.train_data, l1=self.l1, steps=self.sparsity_steps,
                                batch_size=tune.batch_size, lr=self.sparsity_lr, seed=self.seed + step,
                                loss_fn=pruner.loss_fn)

                # The threshold only selects channels: what goes on (and is validated) is the model with the
                # mostly-zero channels removed and every other weight as it was. Retraining is dense here, so
                # zeroing the kept filters' small weights would only charge the tolerance a cost it undoes.
                before = {k: v.clone() for k, v in model.state_dict().items()}

                def remove_flagged(thresholded):  # -> (units, number flagged); thresholded loses them
                    graph_ = DependencyGraph(thresholded, pruner.example_inputs, pruner.ignored_layers)
                    flagged, n = self._flagged_units(pruner, graph_, layer_set, which, target)
                    thresholded.load_state_dict(before)
                    if flagged:
                        graph_.remove(flagged)
                    return flagged, n

                def recover(m):  # the same minibatches for every threshold and for the reference
                    with torch.enable_grad():  # choose_threshold validates under no_grad
                        pruner.fine_tune(tune, self.recovery_steps, self.seed + 2000 + step, model=m)
                    return m

                def candidate(thresholded):
                    pruned = copy.deepcopy(thresholded)
                    remove_flagged(pruned)
                    return recover(pruned)

                reference = recover(copy.deepcopy(model)) if self.recovery_steps else None
                a = choose_threshold(model, weights, pruner.val_data, tolerance=self.tolerance,
                                     eval_fn=pruner.eval_fn, metric=pruner.metric, candidate=candidate,
                                     reference=reference, log=pruner.log)
                units, n_flagged = [], 0
                if a > 0:  # a = 0: every threshold cost accuracy, so this phase prunes nothing
                    units, n_flagged = remove_flagged(model)
                else:
                    model.load_state_dict(before)
                removed_this_round += len(units)
                pruner.fine_tune(tune, tune.steps, self.seed + 1000 + step)
                params, flops = count_params_flops(model, pruner.example_inputs)
                record = {"step": step, "round": rnd + 1, "layers": [k[0] for k in layer_set],
                          "threshold_multiplier": a, "flagged": n_flagged, "removed_units": len(units),
                          "params": params, "flops": flops,
                          **pruner.validate(model)}
                pruner.log(f"singh round {rnd + 1} phase {step}: threshold {a:.3g} x mean|w|, {n_flagged} flagged, "
                           f"-{len(units)} channels, params {params} ({pruner.dense_params / params:.2f}x), "
                           f"FLOPs {flops} ({pruner.dense_flops / flops:.2f}x), val {pruner.metric} "
                           f"{record[f'val_{pruner.metric}']:.4f}")
                yield record
                if (params, flops)[which] <= target:
                    return
            if removed_this_round == 0:
                pruner.log("singh: the target was not reached: a whole round removed no channel")
                return
        pruner.log("singh: the target was not reached within the rounds allowed")


# ---------------------------------------------------------------------------- the driver
def _score_batches(data, batch_size: int, n: int, seed: int) -> List[tuple]:
    """``n`` deterministic random minibatches of ``data`` (for data-driven criteria)."""
    from pycompress.train import collate

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)
    out = []
    for b in range(n):
        idx = perm[(b * batch_size) % len(data):][:batch_size]
        if len(idx) == 0:
            break
        out.append(collate(data, idx.tolist()))
    return out


class Pruner:
    """Prunes ``model`` in place, one schedule step per :meth:`step`.

    Args:
        model (nn.Module): the model, modified in place (see :func:`prune` for a copy).
        example_inputs (Tensor | tuple[Tensor]): inputs for tracing and counting.
        criterion (str | Criterion): a name in ``CRITERIA`` or an instance with its options.
        schedule (Schedule): :class:`OneShot`, :class:`Iterative`, :class:`Phased`, ...
        target (Target): the size to reach and the per-layer caps.
        train_data (Dataset, optional): scoring minibatches and fine-tuning.
        val_data (Dataset, optional): per-step validation accuracy; Singh's threshold.
        loss_fn (callable, optional): ``loss_fn(model, batch) -> loss``; default cross-entropy.
        ignored_layers (iterable of nn.Module | str): layers never pruned.
        log (callable, optional): receives progress lines.
        eval_fn (callable, optional): ``eval_fn(model, val_data) -> dict`` of metrics; default
            :func:`~pycompress.train.evaluate_classifier`.
        metric (str): the key of ``eval_fn``'s dict that measures quality (``"accuracy"``; a detector's ``"AP50"``).
        on_step (callable, optional): ``on_step(model, record)`` after each step, e.g. to keep a copy of
            the model of every phase for a per-phase report.

    Example:
        >>> pruner = Pruner(model, x, L1(), Iterative(steps=4), Target(params=0.5))
        >>> while pruner.step() is not None:
        ...     print(pruner.history[-1]["params"])
    """

    def __init__(self, model: nn.Module, example_inputs, criterion, schedule: Schedule, target: Target, *,
                 train_data=None, val_data=None, loss_fn: Optional[Callable] = None, ignored_layers: Iterable = (),
                 log: Optional[Callable[[str], None]] = None, eval_fn: Optional[Callable] = None,
                 metric: str = "accuracy", on_step: Optional[Callable[[nn.Module, dict], None]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule (OneShot, Iterative, Phased), got {schedule!r}")
        if not isinstance(target, Target):
            raise TypeError(f"target must be a Target (e.g. Target(params=0.5)), got {target!r}")
        self.model, self.example_inputs = model, example_tuple(example_inputs)
        self.criterion: Criterion = get_criterion(criterion)
        self.schedule, self.target = schedule, target
        self.train_data, self.val_data, self.loss_fn = train_data, val_data, loss_fn
        self.eval_fn, self.metric = eval_fn or evaluate_classifier, metric
        if self.criterion.needs_data and train_data is None:
            raise ValueError(f"criterion {self.criterion.name!r} needs train_data (minibatches to score on)")
        names = {m: n for n, m in model.named_modules()}
        self.ignored_layers = [names.get(l, l) if isinstance(l, nn.Module) else l for l in ignored_layers]
        if not all(isinstance(l, str) for l in self.ignored_layers):
            raise ValueError("ignored_layers must hold submodules of model or their names")
        schedule.check(self)
        self.log = log or (lambda s: None)
        self.on_step = on_step
        graph = self.trace()
        self.dense_params, self.dense_flops = graph.cost()
        self.original_sizes = {group_key(g): len(g) for g in graph.groups}
        self.caps = target.caps(self.original_sizes)
        self.history: List[dict] = []
        self._steps = schedule.run(self)
        self.done = False

    def validate(self, model: nn.Module) -> Dict[str, float]:
        """Every metric of ``eval_fn`` on ``val_data``, keyed ``val_<name>`` as the history records are."""
        return {f"val_{k}": v for k, v in self.eval_fn(model, self.val_data).items()}

    def trace(self) -> DependencyGraph:
        """The dependency graph of the model as it is now."""
        return DependencyGraph(self.model, self.example_inputs, self.ignored_layers)

    def absolute_target(self, fraction: float) -> Dict[str, Optional[int]]:
        """``{"target_params": n, "target_flops": None}`` (or the reverse) for a fraction of the dense model."""
        params = self.target.params is not None
        return {"target_params": int(fraction * self.dense_params) if params else None,
                "target_flops": None if params else int(fraction * self.dense_flops)}

    def scores(self, graph: DependencyGraph, n_batches: int, batch_size: int, seed: int):
        """The criterion's scores, on ``n_batches`` minibatches of ``train_data`` if it needs data."""
        data = _score_batches(self.train_data, batch_size, n_batches, seed) if self.criterion.needs_data else None
        return self.criterion.scores(graph, data, self.loss_fn)

    def fine_tune(self, settings: FineTune, steps: int, seed: int, model: Optional[nn.Module] = None):
        """``steps`` SGD minibatches on ``train_data`` (nothing for 0), of the pruner's model or ``model``."""
        if steps:
            _fine_tune(self.model if model is None else model, self.train_data, steps,
                       batch_size=settings.batch_size, lr=settings.lr, momentum=settings.momentum,
                       weight_decay=settings.weight_decay, seed=seed, step_fn=self.loss_fn)

    def step(self) -> Optional[dict]:
        """Runs one schedule step; returns its history record, or None once the schedule is done."""
        if self.done:
            return None
        record = next(self._steps, None)
        if record is None:
            self.done = True
            return None
        self.history.append(record)
        if self.on_step is not None:
            self.on_step(self.model, record)
        return record

    def run(self) -> nn.Module:
        """Runs every remaining step; returns the (pruned, in place) model."""
        while self.step() is not None:
            pass
        return self.model


# ---------------------------------------------------------------------------- prune()
_LEGACY = {"target_params", "target_flops", "channel_ratio", "steps", "units_per_step", "per_layer", "round_to",
           "max_layer_ratio", "batch_size", "score_batches", "fine_tune_steps", "lr", "momentum", "weight_decay",
           "seed", "singh"}


def objects_from_options(criterion, target_params=None, target_flops=None, channel_ratio=None, steps=1, units_per_step=None,
                 per_layer=False, round_to=1, max_layer_ratio=0.9, batch_size=32, score_batches=8,
                 fine_tune_steps=0, lr=0.01, momentum=0.9, weight_decay=1e-4, seed=0, singh=None):
    """(criterion, schedule, target) from flat options: what a :class:`~pycompress.config.PruneConfig` and the
    deprecated keyword form of :func:`prune` both give."""
    if sum(v is not None for v in (target_params, target_flops, channel_ratio)) != 1:
        raise ValueError("give exactly one of target_params, target_flops and channel_ratio")
    _check_fraction("target_params", target_params)
    _check_fraction("target_flops", target_flops)
    _check_fraction("channel_ratio", channel_ratio, low_open=False)
    for name, v, lo in (("steps", steps, 1), ("round_to", round_to, 1), ("batch_size", batch_size, 1),
                        ("score_batches", score_batches, 1), ("fine_tune_steps", fine_tune_steps, 0)):
        _check_int(name, v, lo)
    _check_fraction("max_layer_ratio", max_layer_ratio)
    if units_per_step is not None:
        _check_int("units_per_step", units_per_step, 1)
        if channel_ratio is not None:
            raise ValueError("units_per_step needs target_params or target_flops, not channel_ratio")
    opts = dict(singh or {})
    crit = get_criterion(criterion, **({"rho": opts.pop("rho")} if "rho" in opts else {}))
    target = Target(params=target_params, macs=target_flops, channels=channel_ratio, per_layer=per_layer,
                    round_to=round_to, max_layer_ratio=max_layer_ratio)
    tune = FineTune(steps=fine_tune_steps, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = crit.default_schedule()
    if isinstance(schedule, Phased):
        allowed = {"phases", "l1", "sparsity_steps", "tolerance", "rounds", "lr", "phase_layers", "recovery_steps"}
        if set(opts) - allowed:
            raise ValueError(f"singh options must be among {sorted(allowed | {'rho'})}, got "
                             f"{sorted(set(opts) - allowed)}")
        if "lr" in opts:
            opts["sparsity_lr"] = opts.pop("lr")
        if not opts.get("phase_layers", True):  # the config's empty list: equal slices
            del opts["phase_layers"]
        schedule = Phased(**opts, fine_tune=tune, seed=seed)
    else:
        schedule = Iterative(steps, units_per_step=units_per_step, score_batches=score_batches, fine_tune=tune,
                             seed=seed)
    return crit, schedule, target


def prune(model: nn.Module, example_inputs, criterion="taylor", schedule: Optional[Schedule] = None,
          target: Optional[Target] = None, *, train_data=None, val_data=None, loss_fn: Optional[Callable] = None,
          ignored_layers: Iterable = (), inplace: bool = False, history: Optional[list] = None,
          log: Optional[Callable[[str], None]] = None, eval_fn: Optional[Callable] = None, metric: str = "accuracy",
          on_step: Optional[Callable[[nn.Module, dict], None]] = None, **legacy) -> nn.Module:
    """Structurally prunes ``model`` and returns a physically smaller ``nn.Module``.

    Args:
        model (nn.Module): the (trained) model; copied unless ``inplace``.
        example_inputs (Tensor | tuple[Tensor]): inputs for tracing and counting.
        criterion (str | Criterion): ``l1``, ``l2``, ``bn_scale``, ``taylor``, ``taylor_weight``,
            ``singh``, ``random`` or an instance with its options (``Taylor(flops_lambda=1e-3)``).
        schedule (Schedule, optional): :class:`OneShot`, :class:`Iterative` or :class:`Phased`;
            default: the criterion's own (``criterion.default_schedule()``).
        target (Target): the size to reach, e.g. ``Target(params=0.5, round_to=8)``.
        train_data (Dataset): minibatches for data-driven criteria and fine-tuning.
        val_data (Dataset): per-step validation accuracy; the phased schedule's threshold.
        loss_fn (callable): ``loss_fn(model, batch) -> loss``; default cross-entropy.
        ignored_layers (iterable of nn.Module | str): layers never pruned.
        inplace (bool): prune ``model`` itself.
        history (list, optional): receives one dict per step (params, FLOPs, units).
        log (callable, optional): receives progress lines.
        eval_fn (callable, optional): ``eval_fn(model, val_data) -> dict``; default classification accuracy.
        metric (str): the key of ``eval_fn``'s dict used as quality (the threshold, the records).
        on_step (callable, optional): ``on_step(model, record)`` after each step (see :class:`Pruner`).
        **legacy: deprecated (one release): the keyword form ``target_params=``,
            ``target_flops=``, ``channel_ratio=``, ``steps=``, ``units_per_step=``, ``per_layer=``,
            ``round_to=``, ``max_layer_ratio=``, ``batch_size=``, ``score_batches=``,
            ``fine_tune_steps=``, ``lr=``, ``momentum=``, ``weight_decay=``, ``seed=``, ``singh=``.

    Returns:
        nn.Module: the pruned model, same class as ``model``.

    Raises:
        ValueError: bad arguments, untraceable graph (naming the node), or a
            data-driven criterion without ``train_data``.

    Example:
        >>> small = prune(model, torch.randn(1, 1, 8, 8), Taylor(), Iterative(10, fine_tune=FineTune(30)),
        ...               Target(params=0.1), train_data=train_set)
    """
    unknown = set(legacy) - _LEGACY
    if unknown:
        raise TypeError(f"prune() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if target is None and schedule is not None and not legacy:
        raise ValueError("prune(): target is required, e.g. Target(params=0.5)")
    if legacy or target is None:
        if schedule is not None or target is not None:
            raise TypeError("prune(): give schedule and target objects or the deprecated keywords "
                            f"({', '.join(sorted(legacy))}), not both")
        warnings.warn("prune(model, x, criterion, target_params=..., steps=..., ...) is deprecated and will be "
                      "removed in the next release: pass a schedule and a target, e.g. "
                      "prune(model, x, 'l1', OneShot(), Target(params=0.5))", DeprecationWarning, stacklevel=2)
        criterion, schedule, target = objects_from_options(criterion, **legacy)
    criterion = get_criterion(criterion)
    schedule = criterion.default_schedule() if schedule is None else schedule
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    pruner = Pruner(model, example_inputs, criterion, schedule, target, train_data=train_data, val_data=val_data,
                    loss_fn=loss_fn, ignored_layers=ignored_layers, log=log, eval_fn=eval_fn, metric=metric,
                    on_step=on_step)
    pruner.run()
    if history is not None:
        history.extend(pruner.history)
    return model
