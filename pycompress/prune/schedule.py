"""Choosing which units to remove: ranking, per-layer caps, channel rounding, targets.

A *plan* turns criterion scores into a set of units such that the model's
parameter or FLOPs count reaches a target, under three constraints:

- ``max_layer_ratio``: no group loses more than this fraction of its *original*
  channels (and every group keeps at least one);
- ``round_to``: every group keeps a multiple of ``round_to`` channels (vector
  widths of the conv kernels: without it, 33 channels run no faster than 48);
- ranking: ``global`` compares scores across groups; ``per_layer`` replaces each
  score by its rank quantile inside its group, so every group loses the same
  fraction.

The number of units removed is found by bisection on the exact cost of the
candidate set (:meth:`DependencyGraph.cost`), so the target is met with the
fewest removals the ranking allows.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch

from pycompress.prune.graph import DependencyGraph, Group

__all__ = ["group_key", "select_units", "plan_removal"]


def group_key(group: Group) -> Tuple[str, ...]:
    """A name for a group that survives pruning (its member dims), to track original sizes."""
    return tuple(str(m) for m in group.members)


def _removable(group: Group, original: int, max_layer_ratio: float, round_to: int) -> int:
    size = len(group)
    min_keep = max(1, math.ceil((1.0 - max_layer_ratio) * original - 1e-9))
    min_keep = min(size, math.ceil(min_keep / round_to) * round_to)
    return max(0, size - min_keep)


def select_units(graph: DependencyGraph, scores: Dict[int, torch.Tensor], n: int, *, per_layer: bool = False,
                 round_to: int = 1, max_layer_ratio: float = 0.9,
                 original_sizes: Optional[Dict[tuple, int]] = None) -> List[int]:
    """The ``n`` lowest-scored units allowed by the caps, then rounded per group.

    Rounding keeps *more* channels (``kept`` is rounded up to a multiple of
    ``round_to``), so the result may hold fewer than ``n`` units.
    """
    original_sizes = original_sizes or {}
    entries = []
    for gi, s in scores.items():
        s = s.double()
        if per_layer:  # rank quantile: equal fractions per group
            s = (s.argsort().argsort().double() + 1) / len(s)
        entries += [(float(v), gi, pos) for pos, v in enumerate(s)]
    entries.sort()
    caps = {gi: _removable(graph.groups[gi], original_sizes.get(group_key(graph.groups[gi]), len(graph.groups[gi])),
                           max_layer_ratio, round_to) for gi in scores}
    chosen: Dict[int, List[int]] = {gi: [] for gi in scores}
    taken = 0
    for _, gi, pos in entries:
        if taken >= n:
            break
        if len(chosen[gi]) < caps[gi]:
            chosen[gi].append(pos)
            taken += 1
    units = []
    for gi, positions in chosen.items():
        size = len(graph.groups[gi])
        kept = size - len(positions)
        if round_to > 1 and kept % round_to:
            kept = min(size, math.ceil(kept / round_to) * round_to)
        units += [graph.groups[gi].units[p] for p in positions[:size - kept]]
    return units


def plan_removal(graph: DependencyGraph, scores: Dict[int, torch.Tensor], *, target_params: Optional[int] = None,
                 target_flops: Optional[int] = None, per_layer: bool = False, round_to: int = 1,
                 max_layer_ratio: float = 0.9, original_sizes: Optional[Dict[tuple, int]] = None
                 ) -> Tuple[List[int], bool]:
    """Fewest lowest-ranked units whose removal brings params/FLOPs to the absolute target.

    Returns:
        (units, reached): ``reached`` is False when the caps stop short of the target
        (then ``units`` is the largest removal the caps allow).
    """
    if (target_params is None) == (target_flops is None):
        raise ValueError("give exactly one of target_params and target_flops")
    which = 0 if target_params is not None else 1
    target = target_params if target_params is not None else target_flops
    kw = dict(per_layer=per_layer, round_to=round_to, max_layer_ratio=max_layer_ratio, original_sizes=original_sizes)
    total = sum(len(s) for s in scores.values())

    def cost(n):
        units = select_units(graph, scores, n, **kw)
        return graph.cost(units)[which], units

    c, units = cost(total)
    if c > target:
        return units, False
    lo, hi = 0, total  # invariant: cost(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid)[0] <= target:
            hi = mid
        else:
            lo = mid
    if cost(lo)[0] <= target:
        hi = lo
    return cost(hi)[1], True
