"""Channel importance criteria. Lower score = less important = pruned first.

Every criterion scores each *unit* of each prunable :class:`~pycompress.prune.graph.Group`
(a set of coupled channels). Its "filters" are all the weights that produce the
unit's channels: the rows of conv/linear ``out`` members and the depthwise
filters of ``dw`` members; its "input kernels" are the matching slices of the
``in`` members (the next layers).

Data-driven criteria (``taylor``, ``taylor_weight``) raise if they get no data,
and raise if no gradient reached the layers they score: a Taylor criterion never
silently returns zeros.
"""

import contextlib
import itertools
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.prune.graph import DependencyGraph, Group

__all__ = ["Criterion", "L1", "L2", "BNScale", "Taylor", "TaylorWeight", "Singh", "Random", "CRITERIA",
           "register_criterion", "get_criterion", "cross_entropy_step"]

CRITERIA: Dict[str, type] = {}


def register_criterion(cls):
    """Class decorator: makes a :class:`Criterion` subclass available by its ``name``
    (``prune(model, x, "my_name", ...)``, ``--criterion my_name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register_criterion decorates Criterion subclasses, got {cls!r}")
    CRITERIA[cls.name] = cls
    return cls


def cross_entropy_step(model: nn.Module, batch) -> torch.Tensor:
    """Default loss: ``cross_entropy(model(x), y)`` for a batch ``(x, y)``."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


def _weight_slices(graph: DependencyGraph, group: Group, kinds, param: str = "weight"):
    """Yields ``(member, tensor, per-unit index lists, dim)`` for members of the given kinds."""
    mods = graph.modules()
    for m in group.members:
        if m.kind not in kinds:
            continue
        mod = mods[m.module]
        t = getattr(mod, param, None)
        if t is None:
            continue
        dim = 1 if m.kind == "in" else 0
        yield m, t, _weight_indices(mod, m, group.indices[m]), dim


def _weight_indices(module: nn.Module, member, idx_lists):
    """Per unit, the indices of ``member`` along its weight's dim. They are the member's own, except
    for a grouped conv's input channels: its weight holds ``in_channels / groups`` columns, and a
    unit (position k of every group) is column k of every filter."""
    groups = getattr(module, "groups", 1)
    if member.kind != "in" or groups == 1:
        return idx_lists
    per_group = module.in_channels // groups
    return [sorted({i % per_group for i in idx}) for idx in idx_lists]


def _per_unit(t: torch.Tensor, idx_lists, dim: int, fn) -> torch.Tensor:
    """``fn`` applied to the slice of ``t`` along ``dim`` for each unit; returns a vector."""
    return torch.stack([fn(t.detach().index_select(dim, torch.tensor(idx))) for idx in idx_lists])


class Criterion:
    """An importance criterion. Subclasses implement :meth:`group_scores`, take their options
    in the constructor and are registered with :func:`register_criterion`.

    Attributes:
        name (str): the registry name.
        needs_data (bool): True if :meth:`scores` requires ``data``.
    """

    name = "base"
    needs_data = False

    def scores(self, graph: DependencyGraph, data: Optional[Iterable] = None,
               loss_fn: Optional[Callable] = None) -> Dict[int, torch.Tensor]:
        """Scores of every scorable prunable group.

        Args:
            graph (DependencyGraph): the traced model.
            data (iterable of batches, optional): minibatches, e.g. ``[(x, y), ...]``.
            loss_fn (callable, optional): ``loss_fn(model, batch) -> scalar``;
                default :func:`cross_entropy_step`.

        Returns:
            dict[int, Tensor[units]]: group index (in ``graph.groups``) -> float64 scores.
            Groups the criterion cannot score are absent (never pruned).
        """
        if self.needs_data and data is None:
            raise ValueError(f"criterion {self.name!r} needs data: pass minibatches (data=...)")
        out = self.group_scores(graph, data, loss_fn or cross_entropy_step)
        if not out:
            raise ValueError(f"criterion {self.name!r} could not score any prunable group")
        return out

    def group_scores(self, graph, data, loss_fn) -> Dict[int, torch.Tensor]:
        raise NotImplementedError

    def default_schedule(self):
        """The schedule :func:`~pycompress.prune.prune` runs when given none: one shot."""
        from pycompress.prune.pruner import OneShot
        return OneShot()

    def __repr__(self):
        return f"{type(self).__name__}()"


class _Norm(Criterion):
    p = 1

    def group_scores(self, graph, data, loss_fn):
        out = {}
        for gi, g in enumerate(graph.groups):
            if g.locked:
                continue
            total = torch.zeros(len(g), dtype=torch.float64)
            for _, t, idx, dim in _weight_slices(graph, g, ("out", "dw")):
                total += _per_unit(t, idx, dim, lambda s: s.double().abs().pow(self.p).sum())
            out[gi] = total.pow(1.0 / self.p)
        return out


@register_criterion
class L1(_Norm):
    r"""Filter ℓ1 norm (Li et al. 2017): :math:`S_k = \sum |W_k|` over every filter producing unit k."""

    name, p = "l1", 1


@register_criterion
class L2(_Norm):
    r"""Filter ℓ2 norm: :math:`S_k = \sqrt{\sum W_k^2}` over every filter producing unit k."""

    name, p = "l2", 2


@register_criterion
class BNScale(Criterion):
    r"""Network slimming (Liu et al. 2017): :math:`S_k = \sum_{BN} |\gamma_k|` over the group's BNs.

    Groups without an affine BatchNorm are not scored, hence not pruned.
    """

    name = "bn_scale"

    def group_scores(self, graph, data, loss_fn):
        out = {}
        for gi, g in enumerate(graph.groups):
            if g.locked:
                continue
            parts = [_per_unit(t, idx, 0, lambda s: s.double().abs().sum())
                     for _, t, idx, _ in _weight_slices(graph, g, ("bn",))]
            if parts:
                out[gi] = torch.stack(parts).sum(0)
        return out


@register_criterion
class Random(Criterion):
    """Uniform random scores from ``torch.Generator().manual_seed(seed)``: the baseline."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def group_scores(self, graph, data, loss_fn):
        return {gi: torch.rand(len(g), generator=self.generator, dtype=torch.float64)
                for gi, g in enumerate(graph.groups) if not g.locked}


def _consumer_taps(graph: DependencyGraph):
    """Where to observe each group's activations: the inputs of its consumer layers.

    Returns ``{module name: [(group index, position -> unit index LongTensor)]}``,
    one module per distinct input tensor (a tensor read by several layers, like a
    residual trunk or the input of an Inception block, is counted once).
    """
    taps: Dict[str, list] = {}
    for gi, g in enumerate(graph.groups):
        if g.locked:
            continue
        seen = set()
        for m in g.members:
            if m.kind != "in":
                continue
            node = graph.node_of(m.module)
            src = node.args[0].name
            if src in seen:
                continue
            seen.add(src)
            size = graph.member_size(m)
            pos2unit = torch.full((size,), -1, dtype=torch.long)
            for u, idx in enumerate(g.indices[m]):
                pos2unit[idx] = u
            taps.setdefault(m.module, []).append((gi, pos2unit))
    return taps


def _check_max_batches(max_batches) -> Optional[int]:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    return max_batches


@contextlib.contextmanager
def _scoring_batches(model: nn.Module, data, max_batches: Optional[int]):
    """The first ``max_batches`` minibatches of ``data`` (all if None), with the model in
    eval mode until the caller is done (its training mode is restored even on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield itertools.islice(data, max_batches)
    finally:
        model.train(was_training)


@register_criterion
class Taylor(Criterion):
    r"""Molchanov et al. 2017, activation-based first-order Taylor expansion.

    For feature map k with activation :math:`z^{(k)}` (M spatial positions) and
    cost C, per example:

    .. math::
        \Theta(z^{(k)}) = \Big| \frac{1}{M} \sum_m \frac{\partial C}{\partial z_m^{(k)}} z_m^{(k)} \Big|

    averaged over every example seen, accumulated over the given minibatches,
    then ℓ2-normalised per group, :math:`\hat\Theta = \Theta / \|\Theta\|_2`, and
    optionally penalised by FLOPs, :math:`\hat\Theta - \lambda \cdot \mathrm{FLOPs}(k)`
    with FLOPs(k) in MFLOP (multiply-accumulates per example removed with unit k;
    the paper does not fix the unit).

    z is the tensor entering the next layers (the post-BN/ReLU feature map). For
    a coupled group (residual trunk, a tensor read by several layers after a
    pooling) the signed per-example means of each distinct input tensor are
    summed before the absolute value: the first-order change from removing the
    channel from all of them. A Linear fed by a flatten sees every spatial
    position of the channel as its M positions. Scoring runs in eval mode (BN
    statistics untouched) and uses ``torch.autograd.grad``, so parameter ``.grad``
    fields are not modified.

    Args:
        flops_lambda (float): λ of the FLOPs regulariser; 0 disables it (paper: 1e-3).
        normalize (bool): per-group ℓ2 normalisation (the paper's default).
        max_batches (int, optional): stop after this many minibatches.
    """

    name = "taylor"
    needs_data = True

    def __init__(self, flops_lambda: float = 0.0, normalize: bool = True, max_batches: Optional[int] = None):
        if not isinstance(flops_lambda, (int, float)) or flops_lambda < 0:
            raise ValueError(f"flops_lambda must be a float >= 0, got {flops_lambda!r}")
        self.flops_lambda, self.normalize = float(flops_lambda), bool(normalize)
        self.max_batches = _check_max_batches(max_batches)

    def raw_scores(self, graph, data, loss_fn) -> Dict[int, torch.Tensor]:
        """Θ before normalisation and regularisation."""
        model = graph.model
        taps = _consumer_taps(graph)
        mods = graph.modules()
        captured: List[tuple] = []

        def make_hook(name):
            def hook(module, args):
                captured.append((name, args[0]))
            return hook

        totals = {gi: torch.zeros(len(graph.groups[gi]), dtype=torch.float64)
                  for lst in taps.values() for gi, _ in lst}
        n_examples = 0
        with contextlib.ExitStack() as stack:
            for n in taps:  # each hook is removed on exit, errors included
                stack.enter_context(mods[n].register_forward_pre_hook(make_hook(n)))
            for batch in stack.enter_context(_scoring_batches(model, data, self.max_batches)):
                captured.clear()
                loss = loss_fn(model, batch)
                zs = [z for _, z in captured]
                if not zs or not all(z.requires_grad for z in zs):
                    raise RuntimeError("taylor: no gradient reaches the scored activations (frozen parameters "
                                       "or torch.no_grad?); the criterion would be all zeros")
                grads = torch.autograd.grad(loss, zs, allow_unused=True)
                batch_sum = {gi: None for gi in totals}
                for (name, z), g in zip(captured, grads):
                    if g is None:
                        continue
                    axis = 1 if z.dim() > 2 and not isinstance(mods[name], nn.Linear) else z.dim() - 1
                    zg = (z.detach() * g).double().movedim(axis, 1)
                    N, C = zg.shape[0], zg.shape[1]
                    zg = zg.reshape(N, C, -1)
                    spatial = zg.shape[2]
                    p = zg.sum(2)
                    for gi, pos2unit in taps[name]:
                        valid = pos2unit >= 0
                        U = len(graph.groups[gi])
                        s = torch.zeros(N, U, dtype=torch.float64).index_add_(1, pos2unit[valid], p[:, valid])
                        cnt = torch.bincount(pos2unit[valid], minlength=U).double() * spatial
                        mean = s / cnt
                        batch_sum[gi] = mean if batch_sum[gi] is None else batch_sum[gi] + mean
                for gi, s in batch_sum.items():
                    if s is not None:
                        totals[gi] += s.abs().sum(0)  # |.| per example, then summed over examples
                n_examples += _batch_size(batch)
        if n_examples == 0:
            raise ValueError("taylor: data yielded no minibatch; the criterion needs at least one")
        out = {gi: t / n_examples for gi, t in totals.items()}
        if all(float(t.abs().sum()) == 0.0 for t in out.values()):
            raise RuntimeError("taylor: every score is zero (the loss gradient vanished); refusing to prune "
                               "on a criterion that carries no information")
        return out

    def group_scores(self, graph, data, loss_fn):
        out = self.raw_scores(graph, data, loss_fn)
        for gi, t in out.items():
            if self.normalize:
                norm = t.norm()
                t = t / norm if norm > 0 else t
            if self.flops_lambda:
                u = graph.groups[gi].units[0]
                mflops = (graph.cost()[1] - graph.cost([u])[1]) / 1e6
                t = t - self.flops_lambda * mflops
            out[gi] = t
        return out

    def __repr__(self):
        return f"Taylor(flops_lambda={self.flops_lambda}, normalize={self.normalize})"


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.shape[0])


@register_criterion
class TaylorWeight(Criterion):
    r"""Weight-based first-order Taylor (Torch-Pruning's "Taylor"; Molchanov et al. 2019).

    .. math::
        S_k = \sum_{\theta \in W_k} \big| \theta \cdot \bar g_\theta \big|,
        \qquad \bar g = \frac{1}{B}\sum_{b=1}^{B} \frac{\partial L_b}{\partial \theta}

    over every parameter indexed by unit k: producing filters and biases, BN γ and
    β, and the input kernels of the next layers; ḡ is the gradient averaged over
    the B minibatches. Eval mode; parameter ``.grad`` fields are not modified.
    """

    name = "taylor_weight"
    needs_data = True

    def __init__(self, max_batches: Optional[int] = None):
        self.max_batches = _check_max_batches(max_batches)

    def group_scores(self, graph, data, loss_fn):
        model = graph.model
        mods = graph.modules()
        params = {}
        for g in graph.groups:
            if g.locked:
                continue
            for m in g.members:
                for pname in ("weight", "bias"):
                    t = getattr(mods.get(m.module), pname, None)  # a parameter member has no module
                    if isinstance(t, nn.Parameter) and t.requires_grad and not (m.kind == "in" and pname == "bias"):
                        params[(m.module, pname)] = t
        if not params:
            raise RuntimeError("taylor_weight: no prunable parameter requires grad")
        keys = list(params)
        acc = [torch.zeros_like(params[k], dtype=torch.float64) for k in keys]
        n = 0
        with _scoring_batches(model, data, self.max_batches) as batches:
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(model, batch), [params[k] for k in keys], allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g.double()
                n += 1
        if n == 0:
            raise ValueError("taylor_weight: data yielded no minibatch; the criterion needs at least one")
        contrib = {k: (params[k].detach().double() * a / n).abs() for k, a in zip(keys, acc)}
        out = {}
        for gi, g in enumerate(graph.groups):
            if g.locked:
                continue
            total = torch.zeros(len(g), dtype=torch.float64)
            for m in g.members:
                for pname in ("weight", "bias"):
                    c = contrib.get((m.module, pname))
                    if c is None or (m.kind == "in" and pname == "bias"):
                        continue
                    dim = 1 if m.kind == "in" else 0
                    total += _per_unit(c, _weight_indices(mods[m.module], m, g.indices[m]), dim, torch.sum)
            out[gi] = total
        if all(float(t.sum()) == 0.0 for t in out.values()):
            raise RuntimeError("taylor_weight: every score is zero (the loss gradient vanished)")
        return out


@register_criterion
class Singh(Criterion):
    r"""Singh et al. 2019 filter selection from sparsity statistics of layers l and l+1.

    With :math:`s_{out}(k)` the fraction of zero weights in the filters producing
    unit k (layer l) and :math:`s_{in}(k)` the fraction of zero weights in the
    input kernels that read unit k (layer l+1):

    .. math::
        S_k = 1 - \max\big(s_{out}(k),\ s_{in}(k)\big)

    A unit is *unimportant* when :math:`\max(s_{out}, s_{in}) \ge \rho`
    ("mostly zero"), i.e. :math:`S_k \le 1 - \rho`. The weights are sparse
    only after the sparsity-induction phase (L1 training, then a threshold chosen
    on validation data); see :class:`pycompress.prune.Phased`,
    :func:`pycompress.prune.induce_sparsity` and :func:`pycompress.prune.choose_threshold`. On a dense model all
    scores are 1, so this criterion raises instead of pruning at random.

    Args:
        rho (float): the "mostly zero" fraction in (0, 1].
    """

    name = "singh"

    def __init__(self, rho: float = 0.9):
        if not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        self.rho = float(rho)

    def group_scores(self, graph, data, loss_fn):
        out = {}
        for gi, g in enumerate(graph.groups):
            if g.locked:
                continue
            s_out = torch.zeros(len(g), dtype=torch.float64)
            s_in = torch.zeros(len(g), dtype=torch.float64)
            for kinds, acc in ((("out", "dw"), s_out), (("in",), s_in)):
                zeros = torch.zeros(len(g), dtype=torch.float64)
                count = torch.zeros(len(g), dtype=torch.float64)
                for _, t, idx, dim in _weight_slices(graph, g, kinds):
                    zeros += _per_unit(t, idx, dim, lambda s: (s == 0).sum().double())
                    count += torch.tensor([len(i) * t.numel() / t.shape[dim] for i in idx], dtype=torch.float64)
                acc += torch.where(count > 0, zeros / count.clamp(min=1), torch.zeros_like(count))
            out[gi] = 1.0 - torch.maximum(s_out, s_in)
        if all(bool((t == 1).all()) for t in out.values()):
            raise ValueError("singh: no weight is zero; run the sparsity-induction phase first "
                             "(pycompress.prune.induce_sparsity, or the Phased schedule)")
        return out

    def default_schedule(self):
        """Singh's criterion is meant for its phased schedule (sparsity induction first)."""
        from pycompress.prune.pruner import Phased
        return Phased()

    def unimportant(self, scores: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """Per group, the positions of units whose sparsity reaches ``rho``."""
        return {gi: (s <= 1.0 - self.rho + 1e-12).nonzero().flatten() for gi, s in scores.items()}

    def __repr__(self):
        return f"Singh(rho={self.rho})"


def get_criterion(criterion, **kwargs) -> Criterion:
    """A criterion instance from a name in :data:`CRITERIA` or an instance (returned as is)."""
    if isinstance(criterion, Criterion):
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(f"criterion must be a str or a Criterion, got {type(criterion).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    return CRITERIA[criterion](**kwargs)
