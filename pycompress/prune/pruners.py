"""Layer pruners: how each layer type shrinks, reloads a pruned ``state_dict`` and costs.

A :class:`LayerPruner` knows one layer type's prunable dimensions (its *member
kinds*: ``"out"``/``"in"`` for Conv and Linear, ``"dw"`` for depthwise convs,
``"bn"`` for BatchNorm, ``"norm"`` for LayerNorm). The op rule of the layer
(:mod:`pycompress.prune.rules`) decides which kinds a call site creates; the
pruner rewrites the module when units are removed. Supporting a new layer is
one class registered with :func:`register_pruner` (and one rule)::

    @register_pruner(MyScale)
    class MyScalePruner(LayerPruner):
        def shrink(self, m, keep):
            m.scale = nn.Parameter(m.scale[keep["bn"]].clone())
"""

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["LayerPruner", "register_pruner", "pruner_for", "is_depthwise"]


def is_depthwise(conv: nn.Module) -> bool:
    """True for a conv with one filter per input channel (``groups == in == out > 1``): its channels
    pass through, coupling its input and output (the one place depthwise is decided)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


class LayerPruner:
    """How one layer type shrinks. Subclasses implement :meth:`shrink` and :meth:`saved_keep`;
    layers that do multiply-accumulates (or whose parameter count is not just their tensors'
    sizes) override :meth:`cost`.

    Attributes:
        weight_name (str): the parameter whose saved shape tells how far the layer was pruned.
    """

    weight_name = "weight"

    def shrink(self, module: nn.Module, keep: Dict[str, torch.Tensor]) -> None:
        """Keeps only ``keep[kind]`` (sorted LongTensor) of each dimension kind, in place."""
        raise NotImplementedError

    def saved_keep(self, module: nn.Module, weight_shape: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
        """The ``keep`` that gives ``module`` the saved ``weight_name`` shape (for reloading)."""
        raise NotImplementedError

    def cost(self, module: nn.Module, out_shape: Tuple[int, ...], removed: Dict[str, int]) -> Tuple[int, int]:
        """``(parameters, MACs for one example)`` of ``module`` once ``removed[kind]`` indices go."""
        return _own_params(module), 0


_PRUNERS: Dict[type, LayerPruner] = {}


def register_pruner(*module_types):
    """Class decorator: registers a :class:`LayerPruner` subclass for the given module types."""
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_pruner takes nn.Module subclasses, got {t!r}")

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, LayerPruner)):
            raise TypeError(f"register_pruner decorates LayerPruner subclasses, got {cls!r}")
        for t in module_types:
            _PRUNERS[t] = cls()
        return cls
    return register


def pruner_for(module: nn.Module) -> Optional[LayerPruner]:
    """The pruner registered for ``type(module)`` or its nearest base class, else None."""
    for cls in type(module).__mro__:
        if cls in _PRUNERS:
            return _PRUNERS[cls]
    return None


def _shrink_weight(m: nn.Module, keep: Dict[str, torch.Tensor], out_attr: str, in_attr: str):
    """Keeps rows keep["out"] (and bias entries) and columns keep["in"] of a conv's or Linear's weight."""
    w = m.weight
    if "out" in keep:
        w = w[keep["out"]]
        if m.bias is not None:
            m.bias = _param(m.bias, m.bias[keep["out"]])
        setattr(m, out_attr, len(keep["out"]))
    if "in" in keep:
        w = w[:, keep["in"]]
        setattr(m, in_attr, len(keep["in"]))
    m.weight = _param(m.weight, w)


@register_pruner(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvPruner(LayerPruner):
    """Filters (``out``), input kernels (``in``) or, for a depthwise conv, both at once (``dw``).
    A grouped conv's ``in`` indices count its ``in_channels``; its rule keeps the same positions
    in every group, so the weight keeps the columns of group 0's kept positions."""

    def shrink(self, m, keep):
        if "dw" in keep:
            k = keep["dw"]
            m.weight = _param(m.weight, m.weight[k])
            if m.bias is not None:
                m.bias = _param(m.bias, m.bias[k])
            m.in_channels = m.out_channels = m.groups = len(k)
            return
        if m.groups > 1 and "in" in keep:
            k = keep["in"]
            m.weight = _param(m.weight, m.weight[:, k[k < m.in_channels // m.groups]])
            m.in_channels = len(k)
            keep = {kind: v for kind, v in keep.items() if kind != "in"}
        _shrink_weight(m, keep, "out_channels", "in_channels")

    def saved_keep(self, m, shape):
        if is_depthwise(m):
            return {"dw": torch.arange(shape[0])}
        per_group = m.in_channels // m.groups
        keep_in = torch.cat([torch.arange(shape[1]) + j * per_group for j in range(m.groups)])
        return {"out": torch.arange(shape[0]), "in": keep_in}

    def cost(self, m, out_shape, removed):
        k = math.prod(m.kernel_size)
        spatial = math.prod(out_shape[2:])
        if "dw" in removed or is_depthwise(m):
            c = m.out_channels - removed.get("dw", 0)
            return c * k + (c if m.bias is not None else 0), c * k * spatial
        co, ci = m.out_channels - removed.get("out", 0), m.in_channels - removed.get("in", 0)
        macs = co * (ci // m.groups) * k
        return macs + (co if m.bias is not None else 0), macs * spatial


@register_pruner(nn.Linear)
class LinearPruner(LayerPruner):
    """Rows (``out``) and columns (``in``) of the weight; applied over the last axis."""

    def shrink(self, m, keep):
        _shrink_weight(m, keep, "out_features", "in_features")

    def saved_keep(self, m, shape):
        return {"out": torch.arange(shape[0]), "in": torch.arange(shape[1])}

    def cost(self, m, out_shape, removed):
        co, ci = m.out_features - removed.get("out", 0), m.in_features - removed.get("in", 0)
        return co * ci + (co if m.bias is not None else 0), co * ci * math.prod(out_shape[1:-1])


@register_pruner(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormPruner(LayerPruner):
    """Affine parameters and running statistics of the kept features (``bn``)."""

    def shrink(self, m, keep):
        k = keep["bn"]
        if m.affine:
            m.weight = _param(m.weight, m.weight[k])
            m.bias = _param(m.bias, m.bias[k])
        if m.track_running_stats and m.running_mean is not None:
            m.running_mean = m.running_mean[k].clone()
            m.running_var = m.running_var[k].clone()
        m.num_features = len(k)

    def saved_keep(self, m, shape):
        return {"bn": torch.arange(shape[0])}

    def cost(self, m, out_shape, removed):
        return (2 * (m.num_features - removed.get("bn", 0)) if m.affine else 0), 0


@register_pruner(nn.LayerNorm)
class LayerNormPruner(LayerPruner):
    """A LayerNorm over the last axis (``norm``): its affine parameters and ``normalized_shape``."""

    def shrink(self, m, keep):
        k = keep["norm"]
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is not None:
                setattr(m, name, _param(p, p[k]))
        m.normalized_shape = (len(k),)

    def saved_keep(self, m, shape):
        return {"norm": torch.arange(shape[0])}

    def cost(self, m, out_shape, removed):
        c = m.normalized_shape[0] - removed.get("norm", 0)
        return c * ((m.weight is not None) + (m.bias is not None)), 0


@register_pruner(nn.MultiheadAttention)
class MultiheadAttentionPruner(LayerPruner):
    """``embed``: the embedding positions kept, the same in the input, in each of q, k and v and in
    the output (the module has one ``embed_dim``); its rule keeps them the same in every head."""

    weight_name = "in_proj_weight"

    def shrink(self, m, keep):
        k = keep["embed"]
        e, n = m.embed_dim, len(k)
        rows = torch.cat([k + i * e for i in range(3)])
        m.in_proj_weight = _param(m.in_proj_weight, m.in_proj_weight[rows][:, k])
        if m.in_proj_bias is not None:
            m.in_proj_bias = _param(m.in_proj_bias, m.in_proj_bias[rows])
        for name in ("bias_k", "bias_v"):
            p = getattr(m, name)
            if p is not None:
                setattr(m, name, _param(p, p[..., k]))
        _shrink_weight(m.out_proj, {"out": k, "in": k}, "out_features", "in_features")
        m.embed_dim = m.kdim = m.vdim = n
        m.head_dim = n // m.num_heads

    def saved_keep(self, m, shape):
        return {"embed": torch.arange(shape[1])}

    def cost(self, m, out_shape, removed):
        """Parameters: the module's own and the change of ``out_proj``'s (a submodule the graph never
        sees called). MACs: the four projections per token and the two attention products."""
        e = m.embed_dim - removed.get("embed", 0)
        tokens = math.prod(out_shape[:-1]) // out_shape[0 if m.batch_first else 1]
        own = 3 * e * e + (3 * e if m.in_proj_bias is not None else 0)
        own += sum(e for p in (m.bias_k, m.bias_v) if p is not None)
        out_proj = e * e + (e if m.out_proj.bias is not None else 0)
        return own + out_proj - _own_params(m.out_proj), 4 * e * e * tokens + 2 * tokens * tokens * e
