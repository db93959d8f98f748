"""Op rules: how channels flow through each fx node.

A :class:`Rule` reads the channel information of a node's inputs and returns
that of its output (a :class:`~pycompress.prune.graph.Channels`, a tuple of
them for ops returning several tensors, or None when the output carries no
traced channels). On the way it couples channels (``graph.union``), locks them
(``graph.lock``) or declares the prunable dimensions of a layer
(``graph.add_member``). Rules are looked up by

- module type (its nearest registered base class) for ``call_module`` nodes,
- the function object, or its qualified name (``"torchvision.ops.stochastic_depth.
  stochastic_depth"``, so a library need not be importable) for ``call_function``,
- the method name (``"view"``) for ``call_method``.

Supporting a new layer or function is one registered class::

    @register_rule(MyGate)                 # or a function, or a method name
    class MyGateRule(Rule):
        def propagate(self, graph, node):
            return graph.input_channels(node)   # channel-preserving

A layer with prunable weights also needs a :class:`~pycompress.prune.pruners.LayerPruner`.
A rule whose op mixes channels in a way zeroing cannot express (a LayerNorm over
the channel axis normalises over the *kept* channels) overrides
:meth:`Rule.run_masked`, which :func:`~pycompress.prune.graph.masked_forward` calls.
"""

import math
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pycompress.prune.pruners import is_depthwise

__all__ = ["Rule", "register_rule", "rule_for"]


class Rule:
    """How channels flow through one kind of fx node. Subclasses implement :meth:`propagate`.

    Attributes:
        reads_untraced (bool): run the rule even when no input carries channels (a layer reading a
            graph input creates its own, locked, input channels); else such nodes stay untraced.
    """

    reads_untraced = False

    def propagate(self, graph, node: torch.fx.Node):
        """The output's channel information (see the module docstring); may call ``graph.refuse``."""
        raise NotImplementedError

    def run_masked(self, masker, node: torch.fx.Node, args: tuple, kwargs: dict):
        """Computes ``node`` in the masked original; the default runs it as written."""
        return masker.run_unmasked(node, args, kwargs)


_MODULE_RULES: Dict[type, Rule] = {}
_FUNCTION_RULES: Dict[object, Rule] = {}
_METHOD_RULES: Dict[str, Rule] = {}


def register_rule(*targets):
    """Class decorator registering a :class:`Rule` for module types, functions, qualified function
    names (a string with a dot) or tensor method names (a string without one)."""
    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"register_rule decorates Rule subclasses, got {cls!r}")
        rule = cls()
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                _MODULE_RULES[t] = rule
            elif isinstance(t, str):
                (_FUNCTION_RULES if "." in t else _METHOD_RULES)[t] = rule
            elif callable(t):
                _FUNCTION_RULES[t] = rule
            else:
                raise TypeError(f"register_rule targets must be module types, functions or names, got {t!r}")
        return cls
    return register


def _qualified_name(fn) -> Optional[str]:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else None


def rule_for(node: torch.fx.Node, module: Optional[nn.Module] = None) -> Optional[Rule]:
    """The rule registered for ``node`` (``module`` is the called submodule of a call_module node)."""
    if node.op == "call_module":
        return next((_MODULE_RULES[c] for c in type(module).__mro__ if c in _MODULE_RULES), None)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    if node.op == "call_function":
        try:
            rule = _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        return rule or _FUNCTION_RULES.get(_qualified_name(node.target))
    return None


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------- layers
@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Input channels -> fresh output channels. A depthwise conv passes its channels through; a
    grouped one is pruned the same way in every group (:class:`GroupedConvRule`)."""

    reads_untraced = True

    def propagate(self, graph, node):
        m, name = graph.module(node), node.target
        x = graph.input_channels(node, axis=1)
        if x.axis != 1 or len(x.atoms) != m.in_channels:
            graph.refuse(node, f"expected {m.in_channels} channels on dim 1, found {len(x.atoms)} on dim {x.axis}")
        if is_depthwise(m):
            graph.add_member(name, "dw", x.atoms)
            return graph.Channels(1, x.atoms)
        if m.groups > 1:
            return _GROUPED_CONV.propagate(graph, node)
        graph.add_member(name, "in", x.atoms)
        out = graph.new_atoms(m.out_channels)
        graph.add_member(name, "out", out)
        return graph.Channels(1, out)


class GroupedConvRule(Rule):
    """A grouped conv (``1 < groups``, not depthwise: ResNeXt, RegNet). Group ``j`` reads input
    channels ``j * in/groups ..`` and writes output channels ``j * out/groups ..``, and every group
    must keep the same number of each. So position ``k`` of every group is coupled, on the input
    side and, separately, on the output side: removing one unit removes input (or output) position
    ``k`` of every group, ``groups`` stays, and each group's filters lose the same columns. With
    one channel per group on a side (a depthwise conv with a channel multiplier) that side is locked:
    its one unit would be all the channels."""

    def propagate(self, graph, node):
        m, name = graph.module(node), node.target
        x = graph.input_channels(node, axis=1)
        out = graph.new_atoms(m.out_channels)
        for atoms, side in ((x.atoms, "input"), (out, "output")):
            per_group = len(atoms) // m.groups
            for j in range(1, m.groups):
                graph.union_all(atoms[:per_group], atoms[j * per_group:(j + 1) * per_group])
            if per_group == 1:
                graph.lock(atoms, f"grouped conv '{name}' has one {side} channel per group (groups={m.groups})")
        graph.add_member(name, "in", x.atoms)
        graph.add_member(name, "out", out)
        return graph.Channels(1, out)


_GROUPED_CONV = GroupedConvRule()


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Features on the last axis -> fresh output features on the last axis."""

    reads_untraced = True

    def propagate(self, graph, node):
        m = graph.module(node)
        x = graph.input_channels(node, axis=-1)
        if x.axis != len(graph.shape(node)) - 1 or len(x.atoms) != m.in_features:
            graph.refuse(node, f"a Linear needs its {m.in_features} traced features on the last dim")
        graph.add_member(node.target, "in", x.atoms)
        out = graph.new_atoms(m.out_features)
        graph.add_member(node.target, "out", out)
        return graph.Channels(x.axis, out)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    reads_untraced = True

    def propagate(self, graph, node):
        m = graph.module(node)
        x = graph.input_channels(node, axis=1)
        if x.axis != 1 or len(x.atoms) != m.num_features:
            graph.refuse(node, f"expected {m.num_features} features on dim 1")
        graph.add_member(node.target, "bn", x.atoms)
        return x


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    """A LayerNorm over the last axis: over the channels (channels-last blocks, transformers) it is
    a prunable ``norm`` member; over another axis it acts on each channel alone."""

    def propagate(self, graph, node):
        m = graph.module(node)
        x = graph.input_channels(node, axis=-1)
        ndim = len(graph.shape(node))
        if len(m.normalized_shape) != 1:
            if x.axis >= ndim - len(m.normalized_shape):
                graph.refuse(node, "a LayerNorm over several dims including the channel dim")
            return x
        if x.axis != ndim - 1:
            return x
        graph.add_member(node.target, "norm", x.atoms)
        return x

    def run_masked(self, masker, node, args, kwargs):
        """Normalises over the kept channels only: what the pruned LayerNorm computes."""
        m, x = masker.submodule(node), args[0]
        info = masker.dependencies.channels(node.args[0])
        if len(m.normalized_shape) != 1 or info.axis != x.dim() - 1:
            return masker.run_unmasked(node, args, kwargs)
        return _layer_norm_over_kept(x, masker.keep(info).nonzero().flatten(), m.weight, m.bias, m.eps)


def _layer_norm_over_kept(x, kept, weight, bias, eps):
    """What a LayerNorm over the last axis, pruned to the ``kept`` positions, computes (zeros elsewhere)."""
    out = torch.zeros_like(x)
    w = None if weight is None else weight[kept]
    b = None if bias is None else bias[kept]
    out[..., kept] = F.layer_norm(x[..., kept], (len(kept),), w, b, eps)
    return out


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` has one ``embed_dim`` for its input, q, k, v and output, and
    ``head_dim = embed_dim // num_heads``: its embedding positions are one member, coupled between
    query, key, value and output, and position d of every head is coupled (each head loses the
    same dims). The masked reference runs the module shrunk to the kept positions, since its
    softmax scale follows the head dim."""

    def propagate(self, graph, node):
        m = graph.module(node)
        if not m._qkv_same_embed_dim:
            graph.refuse(node, "MultiheadAttention with kdim/vdim different from embed_dim")
        q = graph.input_channels(node, axis=-1)
        ndim = len(graph.shape(node.args[0]))
        if q.axis != ndim - 1 or len(q.atoms) != m.embed_dim:
            graph.refuse(node, f"expected {m.embed_dim} embedding features on the last dim")
        for arg in node.args[1:3]:
            kv = graph.channels(arg)
            if isinstance(kv, graph.Channels):
                graph.union_all(q.atoms, kv.atoms)
            elif isinstance(arg, torch.fx.Node):
                graph.lock(q.atoms, f"key/value of node '{node.name}' are not traced")
        for h in range(1, m.num_heads):
            graph.union_all(q.atoms[:m.head_dim], q.atoms[h * m.head_dim:(h + 1) * m.head_dim])
        graph.add_member(node.target, "embed", q.atoms)
        return graph.Channels(q.axis, q.atoms), None

    def run_masked(self, masker, node, args, kwargs):
        import copy

        from pycompress.prune.pruners import pruner_for

        m = masker.submodule(node)
        kept = masker.keep(masker.dependencies.channels(node.args[0])).nonzero().flatten()
        small = copy.deepcopy(m)
        pruner_for(small).shrink(small, {"embed": kept})
        out, weights = small(*(a[..., kept] for a in args[:3]), *args[3:], **kwargs)
        full = out.new_zeros(out.shape[:-1] + (m.embed_dim,))
        full[..., kept] = out
        return full, weights


# ---------------------------------------------------------------------------- channel-preserving
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity, nn.ZeroPad2d, nn.Upsample)
_CHANNELWISE_FUNCTIONS = (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.interpolate, torch.clamp,
    # stochastic depth scales each sample (torchvision wraps it as one fx leaf)
    "torchvision.ops.stochastic_depth.stochastic_depth")
_CHANNELWISE_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "clamp",
                        "clamp_", "float", "double", "half", "to", "type_as", "detach")


@register_rule(*_CHANNELWISE_MODULES, *_CHANNELWISE_FUNCTIONS, *_CHANNELWISE_METHODS)
class ChannelwiseRule(Rule):
    """Acts on each channel alone (activations, pooling, dropout, per-sample scaling): channels pass."""

    def propagate(self, graph, node):
        return graph.input_channels(node)


@register_rule(nn.PReLU)
class PReLURule(Rule):
    def propagate(self, graph, node):
        if graph.module(node).num_parameters > 1:
            graph.refuse(node, "PReLU with per-channel parameters is not rewritten")
        return graph.input_channels(node)


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")
class SoftmaxRule(Rule):
    """Softmax over a dim that does not carry channels (attention scores) acts on each channel alone;
    over the channel dim it mixes them: they are locked and the output is untraced."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        dim = graph.module(node).dim if node.op == "call_module" else _arg(node, 1, "dim")
        if dim is None or dim % len(graph.shape(node)) == x.axis:
            graph.lock(x.atoms, f"a softmax over the channel dim in node '{node.name}' mixes them")
            return None
        return x


_ELEMENTWISE = (operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")


@register_rule(*_ELEMENTWISE)
class ElementwiseRule(Rule):
    """Residual add/sub, gating mul, division by an untraced tensor: operands' channels are coupled
    position by position. An untraced operand that does not broadcast over the channel dim (a
    parameter such as a position embedding) locks the channels: it cannot be shrunk."""

    def propagate(self, graph, node):
        out_ndim = len(graph.shape(node))
        operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        traced = [(a, graph.channels(a)) for a in operands if isinstance(graph.channels(a), graph.Channels)]
        if not traced:
            graph.refuse(node, "its operands carry channels in a form it cannot combine")
        if node.target in (operator.truediv, operator.itruediv, torch.div, "div", "div_") and \
                isinstance(graph.channels(_arg(node, 1, "other")), graph.Channels):
            graph.refuse(node, "dividing by a tensor whose channels may be pruned")
        (first_arg, first), axis = traced[0], None
        axis = first.axis + out_ndim - len(graph.shape(first_arg))  # aligned from the right (broadcasting)
        for a, c in traced[1:]:
            if c.axis + out_ndim - len(graph.shape(a)) != axis or len(c.atoms) != len(first.atoms):
                graph.refuse(node, "operands carry different channels")
            graph.union_all(first.atoms, c.atoms)
        for a in operands:
            shape = graph.shape(a)
            if shape is None or isinstance(graph.channels(a), graph.Channels):
                continue
            ax = axis - (out_ndim - len(shape))
            if 0 <= ax < len(shape) and shape[ax] != 1 and not adopt_parameter(graph, a, axis - out_ndim, first.atoms):
                graph.lock(first.atoms, f"combined in node '{node.name}' with '{a.name}', whose channels are not "
                                        "traced")
        return graph.Channels(axis, first.atoms)


# ---------------------------------------------------------------------------- layout
def _dim_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> List[Tuple[range, range]]:
    """Pairs of input/output dim ranges with equal products: how a reshape regroups dims."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        s, t, pi, pj = i, j, 1, 1
        if i < len(in_shape):
            pi, i = in_shape[i], i + 1
        if j < len(out_shape):
            pj, j = out_shape[j], j + 1
        while pi != pj and i <= len(in_shape) and j <= len(out_shape):
            if pi < pj and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
            elif j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
            else:
                break
        groups.append((range(s, i), range(t, j)))
    return groups


def _fixed_sizes(graph, node, x) -> Dict[int, str]:
    """Output dims of a ``view``/``reshape`` whose size will not follow pruning: a literal int
    (``x.view(n, 512)``) or a size read from a tensor with other channels (Swin's
    ``reshape(B, N, 3, heads, C // heads)``, C being the block input's width). Sizes read from
    the shape of a tensor carrying the same channels (a channel shuffle's) or ``-1`` follow."""
    if node.target not in ("view", "reshape", torch.reshape):
        return {}
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    own = {graph.find(a) for a in x.atoms}
    fixed = {}
    for d, s in enumerate(shape):
        if isinstance(s, int) and not isinstance(s, bool) and s != -1:
            fixed[d] = str(s)
        elif isinstance(s, torch.fx.Node) and not _read_from_shapes_of(graph, s, own):
            fixed[d] = f"'{s.name}' (read from the shape of a tensor with other channels)"
    return fixed


def _read_from_shapes_of(graph, size: torch.fx.Node, own: set) -> bool:
    """True if ``size`` is computed from ``.size()``/``.shape`` of tensors carrying channels ``own``."""
    stack, sources = [size], []
    while stack:
        n = stack.pop()
        if (n.op == "call_method" and n.target == "size") or (n.op == "call_function" and n.target is getattr):
            sources.append(n.args[0])
        elif n.op in ("call_function", "call_method"):
            stack.extend(n.all_input_nodes)
        else:
            return False
    infos = [graph.channels(t) for t in sources]
    return bool(sources) and all(isinstance(i, graph.Channels) and {graph.find(a) for a in i.atoms} == own
                                 for i in infos)


@register_rule(nn.Flatten, torch.flatten, torch.reshape, "flatten", "view", "reshape", "squeeze", "unsqueeze",
               torch.squeeze, torch.unsqueeze)
class ReshapeRule(Rule):
    """Reshapes, read from the traced shapes:

    - the channel dim kept whole (maybe renumbered): channels pass;
    - merged with the dims after or before it (``flatten`` before a Linear, the end of a channel
      shuffle): each merged position carries the channel it came from, so a channel repeats;
    - split into several dims (``view(B, g, C/g, H, W)``, heads): the dim whose size the code
      computes keeps the channels and the others have a size fixed in the code (groups,
      heads), so their positions are coupled: every slice loses the same channels;
    - anything else mixes channels: they are locked and the output is untraced.

    A size fixed in the code on the dim that carries channels locks them (it would be wrong after
    pruning; see :func:`_fixed_sizes`).
    """

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        in_shape, out_shape = graph.shape(node.args[0]), graph.shape(node)
        literal = _fixed_sizes(graph, node, x)
        dims_in, dims_out = next((i, o) for i, o in _dim_groups(in_shape, out_shape) if x.axis in i)
        dims_in = [d for d in dims_in if in_shape[d] != 1 or d == x.axis]
        dims_out = [d for d in dims_out if out_shape[d] != 1] or list(dims_out)[:1]
        if not dims_out:
            graph.refuse(node, f"reshape {in_shape} -> {out_shape} drops the channel dim")
        if len(dims_out) == 1:
            axis = dims_out[0]
            radix = [in_shape[d] for d in dims_in]
            stride = math.prod(in_shape[d] for d in dims_in if d > x.axis)
            atoms = [x.atoms[(p // stride) % len(x.atoms)] for p in range(math.prod(radix))]
            if axis in literal:
                why = adopt_size_attribute(graph, node, literal[axis], x.atoms) if literal[axis].isdigit() else ""
                if why is not None:
                    graph.lock(x.atoms, f"size {literal[axis]} is hard-coded in node '{node.name}'{why}")
            return graph.Channels(axis, atoms)
        if dims_in != [x.axis]:
            graph.lock(x.atoms, f"reshape {in_shape} -> {out_shape} in node '{node.name}' mixes the channel dim "
                                "with others")
            return None
        computed = [d for d in dims_out if d not in literal]
        axis = computed[0] if len(computed) == 1 else dims_out[-1]
        if len(computed) != 1:
            graph.lock(x.atoms, f"the split sizes of the channel dim are hard-coded in node '{node.name}' "
                                f"({', '.join(literal.values())})")
        sizes = [out_shape[d] for d in dims_out]
        inner = math.prod(sizes[dims_out.index(axis) + 1:])
        n = out_shape[axis]
        for p, atom in enumerate(x.atoms):  # couple every position with the same index on ``axis``
            graph.union(x.atoms[((p // inner) % n) * inner], atom)
        return graph.Channels(axis, [x.atoms[i * inner] for i in range(n)])


def adopt_size_attribute(graph, node, size: str, atoms) -> Optional[str]:
    """A width written in the code as an int attribute of the module whose ``forward`` holds the
    reshape (torchvision's ViT: ``x.reshape(n, self.hidden_dim, n_h * n_w)``, traced as the literal
    768). If exactly one public int attribute of that module equals the size, it becomes a ``size``
    member holding ``atoms``, set to the kept count when they are removed. Returns None when
    adopted, else why not (the end of the lock reason)."""
    if int(size) != len(atoms):
        return " (it counts merged positions, not channels)"
    stack = node.meta.get("nn_module_stack")
    owner = list(stack.values())[-1][0] if stack else ""
    module = graph.model.get_submodule(owner)
    names = [k for k, v in vars(module).items() if type(v) is int and v == int(size) and not k.startswith("_")]
    where = f"'{owner}'" if owner else "the model"
    if len(names) != 1:
        return f" (no int attribute of {where} holds it)" if not names else \
            f" (attributes {', '.join(names)} of {where} all hold it)"
    graph.add_size_member(owner, names[0], atoms, node)
    return None


def _probe_axis(node, ndim: int, axis: int) -> int:
    """Where ``node`` (a permute-like op with literal dims) moves dim ``axis``: run it on a probe."""
    probe = torch.empty([2 if d == axis else 1 for d in range(ndim)])
    fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    out = fn(probe, *node.args[1:], **node.kwargs)
    return [d for d, s in enumerate(out.shape) if s == 2][0]


@register_rule(torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims, "permute",
               "transpose", "movedim", "swapaxes", "swapdims")
class PermuteRule(Rule):
    """Moves the channel dim (channels-last blocks, head layouts, a channel shuffle's transpose)."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        if any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            graph.refuse(node, "permutation dims computed at run time")
        return graph.Channels(_probe_axis(node, len(graph.shape(node)), x.axis), x.atoms)


def _space_depth(graph, node, factor_name: str):
    """``(channels, r * r)`` of a pixel (un)shuffle; ``(None, 0)`` after locking the channels when they
    are not on the dim it rearranges (dim -3)."""
    x = graph.input_channels(node)
    if x.axis != len(graph.shape(node)) - 3:
        graph.lock(x.atoms, f"node '{node.name}' moves spatial positions and channels into each other's dims")
        return None, 0
    factor = getattr(graph.module(node), factor_name) if node.op == "call_module" else _arg(node, 1, factor_name)
    if not isinstance(factor, int) or isinstance(factor, bool):
        graph.refuse(node, f"{factor_name} computed at run time")
    return x, factor * factor


@register_rule(nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
class PixelUnshuffleRule(Rule):
    """Space-to-depth (YOLOv2's passthrough): output channel ``c * r * r + k`` is a spatial phase of
    input channel ``c``, so each input channel repeats ``r * r`` times, in place. Removing channel
    ``c`` removes its ``r * r`` phases and the layout of the others stays ``c' * r * r + k``."""

    def propagate(self, graph, node):
        x, r2 = _space_depth(graph, node, "downscale_factor")
        return None if x is None else graph.Channels(x.axis, [a for a in x.atoms for _ in range(r2)])


@register_rule(nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle)
class PixelShuffleRule(Rule):
    """Depth-to-space: input channels ``c * r * r .. c * r * r + r * r - 1`` become the spatial
    phases of output channel ``c``; they are coupled, so a group is removed whole or not at all."""

    def propagate(self, graph, node):
        x, r2 = _space_depth(graph, node, "upscale_factor")
        if x is None:
            return None
        for start in range(0, len(x.atoms), r2):
            graph.union_all([x.atoms[start]] * r2, x.atoms[start:start + r2])
        return graph.Channels(x.axis, x.atoms[::r2])


@register_rule(torch.cat, torch.concat, torch.concatenate)
class CatRule(Rule):
    """On the channel dim the channel lists are concatenated (offsets come for free); on another dim
    the inputs' channels are coupled position by position. An untraced input (a class token, a
    constant) brings locked channels of its own on the channel dim and locks the others' otherwise."""

    def propagate(self, graph, node):
        tensors = _arg(node, 0, "tensors")
        ndim = len(graph.shape(node))
        dim = _arg(node, 1, "dim", 0) % ndim
        chans = [graph.channels(t) for t in tensors]
        traced = [c for c in chans if isinstance(c, graph.Channels)]
        if not traced or any(c.axis != traced[0].axis for c in traced):
            graph.refuse(node, "inputs carry channels on different dims")
        axis = traced[0].axis
        untraced = [t for t, c in zip(tensors, chans) if not isinstance(c, graph.Channels)]
        if dim == axis:
            why = f"concatenated in node '{node.name}' with untraced tensors"
            return graph.Channels(axis, [a for t, c in zip(tensors, chans) for a in (
                c.atoms if isinstance(c, graph.Channels) else graph.new_atoms(graph.shape(t)[axis], locked=why))])
        for c in traced[1:]:
            if len(c.atoms) != len(traced[0].atoms):
                graph.refuse(node, "inputs carry different channel counts")
            graph.union_all(traced[0].atoms, c.atoms)
        untraced = [t for t in untraced if not adopt_parameter(graph, t, axis - ndim, traced[0].atoms)]
        if untraced:
            graph.lock(traced[0].atoms, f"concatenated in node '{node.name}' with '{untraced[0].name}', whose "
                                        "channels are not traced")
        return traced[0]


@register_rule(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split")
class SplitRule(Rule):
    """Pieces along the channel axis. ``chunk`` into equal pieces couples the pieces position
    by position, so every piece loses the same channels and ``chunk(n)`` still splits at the
    right place after pruning. ``split``/``tensor_split`` carry literal sizes in the model's
    code, which pruning cannot rewrite: their channels are locked (never pruned)."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        dim = _arg(node, 2, "dim", 0)
        outs = node.meta.get("tensor_meta")
        if not isinstance(outs, (tuple, list)):
            graph.refuse(node, "split output shapes unknown")
        if dim % len(outs[0].shape) != x.axis:
            return tuple(x for _ in outs)
        sizes = [o.shape[x.axis] for o in outs]
        if node.target in (torch.chunk, "chunk") and len(set(sizes)) == 1:
            for piece in range(1, len(sizes)):
                graph.union_all(x.atoms[:sizes[0]], x.atoms[piece * sizes[0]:(piece + 1) * sizes[0]])
        else:
            graph.lock(x.atoms, f"split sizes are hard-coded in node '{node.name}'")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(graph.Channels(x.axis, x.atoms[s:s + n]) for s, n in zip(starts, sizes))


@register_rule(operator.getitem)
class GetItemRule(Rule):
    """One output of a split, or basic indexing that keeps the channel dim whole (``x[:, 0]`` on a
    token dim). Indexing the channel dim itself is refused: its literal positions would shift."""

    def propagate(self, graph, node):
        src, index = graph.channels(node.args[0]), node.args[1]
        if isinstance(src, tuple):
            if isinstance(index, int):
                return src[index]
            graph.refuse(node, "indexing a split output with a non-int")
        if not isinstance(src, graph.Channels):
            graph.refuse(node, "indexing a tensor that carries channels")
        index = index if isinstance(index, tuple) else (index,)
        ndim = len(graph.shape(node.args[0]))
        used = sum(i is not None and i is not Ellipsis for i in index)
        expanded = [e for i in index for e in ([slice(None)] * (ndim - used) if i is Ellipsis else [i])]
        in_dim = out_dim = 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == src.axis:
                if i != slice(None):
                    graph.refuse(node, "indexing a tensor that carries channels on its channel dim")
                return graph.Channels(out_dim, src.atoms)
            if not isinstance(i, (int, slice)):
                graph.refuse(node, "advanced indexing of a tensor that carries channels")
            in_dim, out_dim = in_dim + 1, out_dim + isinstance(i, slice)
        return graph.Channels(out_dim + src.axis - in_dim, src.atoms)


@register_rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
class ReduceRule(Rule):
    """A reduction over dims that do not carry channels (global pooling written as ``mean``) keeps
    them; one over the channel dim (a per-sample scale) locks them and leaves the output untraced."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        dims, keepdim = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
        ndim = len(graph.shape(node.args[0]))
        dims = range(ndim) if dims is None else [d % ndim for d in (dims if isinstance(dims, (tuple, list))
                                                                     else (dims,))]
        if x.axis in dims:
            graph.lock(x.atoms, f"node '{node.name}' reduces over the channel dim")
            return None
        return graph.Channels(x.axis if keepdim else x.axis - sum(d < x.axis for d in dims), x.atoms)


@register_rule(getattr, "size", "dim")
class ShapeRule(Rule):
    """Shape queries carry no channels."""

    def propagate(self, graph, node):
        return None


@register_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
class MatmulRule(Rule):
    """Attention's products. Per operand, the channel dim is a batch dim (heads: coupled with the
    other operand's and kept), the contracted dim (head dims of q and k: coupled, and gone from
    the output) or a free dim (v's features: they pass to the output). A contracted or batch dim
    facing an untraced operand that does not broadcast locks the channels."""

    def propagate(self, graph, node):
        a, b = node.args[0], node.args[1]
        out_ndim = len(graph.shape(node))
        roles = []
        for arg, first in ((a, True), (b, False)):
            c, n = graph.channels(arg), len(graph.shape(arg))
            if not isinstance(c, graph.Channels):
                roles.append((None, None, n))
            elif n == 1 or c.axis == (n - 1 if first else n - 2):
                roles.append(("contract", c, n))
            elif c.axis == (n - 2 if first else n - 1):
                roles.append(("free", c, n))
            else:
                roles.append(("batch", c, n))
        out = None
        for i, (role, c, n) in enumerate(roles):
            other_role, other, other_n = roles[1 - i]
            other_arg = (a, b)[1 - i]
            if role == "free":
                out = graph.Channels(out_ndim - 2 + i, c.atoms)
            elif role is not None:
                axis = c.axis - n  # counted from the right
                if other is not None and other_role == role and (role == "contract" or other.axis - other_n == axis):
                    if len(other.atoms) != len(c.atoms):
                        graph.refuse(node, "operands carry different channel counts")
                    graph.union_all(c.atoms, other.atoms)
                elif role == "contract" or (-axis <= other_n and graph.shape(other_arg)[axis] != 1):
                    graph.lock(c.atoms, f"multiplied in node '{node.name}' with '{other_arg.name}', whose channels "
                                        "are not traced")
                if role == "batch":
                    out = graph.Channels(out_ndim + axis, c.atoms)
        return out


@register_rule(F.scaled_dot_product_attention)
class ScaledDotProductAttentionRule(Rule):
    """``F.scaled_dot_product_attention(q, k, v)``: q's and k's head dims (last) are coupled and
    contracted, v's features (last) pass to the output, heads (a batch dim) are coupled across
    q, k and v and kept. Its default scale follows q's width, so the masked reference runs it on
    the kept head dims."""

    def propagate(self, graph, node):
        args = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
        infos = [graph.channels(a) for a in args]
        ndims = [len(graph.shape(a)) for a in args]
        out_ndim, out = len(graph.shape(node)), None
        cq, ck, cv = infos
        last = [isinstance(c, graph.Channels) and c.axis == n - 1 for c, n in zip(infos, ndims)]
        if last[0] and last[1] and len(cq.atoms) == len(ck.atoms):
            graph.union_all(cq.atoms, ck.atoms)
        else:
            for c, is_last in zip((cq, ck), last[:2]):
                if is_last:
                    graph.lock(c.atoms, f"node '{node.name}' contracts them with untraced head dims")
        if last[2]:
            out = graph.Channels(out_ndim - 1, cv.atoms)
        batch = [(c, c.axis - n) for c, n in zip(infos, ndims) if isinstance(c, graph.Channels) and c.axis < n - 2]
        for c, axis in batch[1:]:
            if axis != batch[0][1] or len(c.atoms) != len(batch[0][0].atoms):
                graph.refuse(node, "q, k and v carry heads on different dims")
            graph.union_all(batch[0][0].atoms, c.atoms)
        if batch:
            if len(batch) < 3:
                graph.lock(batch[0][0].atoms, f"some of q, k, v of node '{node.name}' carry no traced heads")
            out = graph.Channels(out_ndim + batch[0][1], batch[0][0].atoms)
        for c, n in zip(infos[:2], ndims[:2]):
            if isinstance(c, graph.Channels) and c.axis == n - 2:
                graph.lock(c.atoms, f"node '{node.name}' attends over them")
        return out

    def run_masked(self, masker, node, args, kwargs):
        q_info = masker.dependencies.channels(_arg(node, 0, "query"))
        if not (isinstance(q_info, masker.dependencies.Channels) and q_info.axis == args[0].dim() - 1):
            return masker.run_unmasked(node, args, kwargs)
        kept = masker.keep(q_info).nonzero().flatten()
        q, k = args[0][..., kept], args[1][..., kept]
        return F.scaled_dot_product_attention(q, k, *args[2:], **kwargs)


# ---------------------------------------------------------------------------- parameters used as operands
# A parameter read in the forward (ConvNeXt's layer scale, ViT's class token and position embedding)
# is shrunk with the channels it meets, as a member of its own, instead of locking them.
_PASS_TO_OPERAND = ("expand", "expand_as", "contiguous", "clone", "to", "type_as")


def adopt_parameter(graph, operand, axis: int, atoms) -> bool:
    """Makes the parameter behind the untraced ``operand`` a member holding ``atoms`` on its dim
    ``axis`` (counted from the right, as broadcasting aligns dims). It may reach the operand through
    ``expand`` and casts. False, with nothing changed, for anything else: an operand computed from
    the parameter in another way, a parameter read elsewhere too, or a size that does not match."""
    node = operand
    while isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in _PASS_TO_OPERAND:
        if node.target == "expand" and _arg(node, len(graph.shape(node)) + axis + 1, "size", -1) != -1:
            return False  # the channel dim is expanded to a size written in the code
        if len(node.users) != 1:
            return False
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return False
    tensor = _attr(graph.gm, node.target)
    if not isinstance(tensor, torch.Tensor) or -axis > tensor.dim() or tensor.shape[axis] != len(atoms):
        return False
    graph.add_parameter_member(node, tensor.dim() + axis, atoms)
    return True


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


@register_rule(F.layer_norm)
class FunctionalLayerNormRule(Rule):
    """``F.layer_norm`` over the last axis, called by a LayerNorm subclass fx traced through
    (torchvision's channels-first ``LayerNorm2d`` permutes, normalises, permutes back): the
    channels are that module's ``norm`` member, so its ``normalized_shape`` shrinks with them.
    Over another axis it acts on each channel alone; any other caller locks the channels (its
    ``normalized_shape`` is written in the code)."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        shape = _arg(node, 1, "normalized_shape")
        if x.axis < len(graph.shape(node)) - len(shape):
            return x
        weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
        owner = weight.target.rpartition(".")[0] if isinstance(weight, torch.fx.Node) and \
            weight.op == "get_attr" else None
        layer = owner is not None and graph.model.get_submodule(owner)
        if len(shape) == 1 and isinstance(layer, nn.LayerNorm) and weight.target == f"{owner}.weight" and (
                bias is None or getattr(bias, "target", None) == f"{owner}.bias"):
            graph.add_owned_member(owner, "norm", x.atoms, node)
        else:
            graph.lock(x.atoms, f"node '{node.name}' normalises over a shape written in the code")
        return x

    def run_masked(self, masker, node, args, kwargs):
        info = masker.dependencies.channels(node.args[0])
        x = args[0]
        if info.axis != x.dim() - 1:
            return masker.run_unmasked(node, args, kwargs)
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        return _layer_norm_over_kept(x, masker.keep(info).nonzero().flatten(), w, b, eps)


# ---------------------------------------------------------------------------- Swin (torchvision)
def _owner(graph, tensor_node, kind=nn.Linear) -> Optional[str]:
    """The layer of type ``kind`` whose ``weight`` or ``bias`` a get_attr node reads, else None."""
    if not (isinstance(tensor_node, torch.fx.Node) and tensor_node.op == "get_attr"):
        return None
    owner, _, attr = tensor_node.target.rpartition(".")
    return owner if attr in ("weight", "bias") and isinstance(graph.model.get_submodule(owner), kind) else None


@register_rule("torchvision.models.swin_transformer._patch_merging_pad")
class PatchMergingPadRule(Rule):
    """Swin's patch merging: the four 2x2 neighbours concatenated on the (last) channel dim."""

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        if x.axis != len(graph.shape(node)) - 1:
            graph.refuse(node, "patch merging expects the channels on the last dim")
        return graph.Channels(x.axis, x.atoms * 4)


@register_rule("torchvision.models.swin_transformer.shifted_window_attention")
class ShiftedWindowAttentionRule(Rule):
    """torchvision's Swin attention, one opaque function of the block input ``(B, H, W, C)`` and
    the weights of its ``qkv`` and ``proj`` Linear layers. It splits qkv into ``num_heads`` heads of
    ``C // num_heads`` dims, C read from its input: so the input channels, qkv's rows (q, k and v of
    every head) and proj's rows and columns are one set, position ``j`` of every head coupled.
    Removing one unit removes dim ``j`` of every head everywhere, and the head dim stays
    ``C // num_heads``. The masked reference runs the function on the kept channels and rows."""

    _QKV, _PROJ = (1, "qkv_weight"), (2, "proj_weight")
    _BIASES = (9, "qkv_bias"), (10, "proj_bias")

    def _layers(self, graph, node):
        (qkv_w, proj_w), (qkv_b, proj_b) = [[_arg(node, i, n) for i, n in pair]
                                            for pair in ((self._QKV, self._PROJ), self._BIASES)]
        qkv, proj = _owner(graph, qkv_w), _owner(graph, proj_w)
        biases_match = all(b is None or _owner(graph, b) == owner for b, owner in ((qkv_b, qkv), (proj_b, proj)))
        return (qkv, proj) if qkv and proj and biases_match and _arg(node, 11, "logit_scale") is None else None

    def propagate(self, graph, node):
        x = graph.input_channels(node)
        heads, c = _arg(node, 5, "num_heads"), len(x.atoms)
        layers = self._layers(graph, node)
        if x.axis != len(graph.shape(node)) - 1 or not isinstance(heads, int) or c % heads or layers is None:
            graph.lock(x.atoms, f"node '{node.name}' is not a shifted window attention over its own qkv and "
                                "proj Linear layers (or is Swin V2's cosine attention)")
            return x
        qkv, proj = layers
        head_dim = c // heads
        for h in range(1, heads):
            graph.union_all(x.atoms[:head_dim], x.atoms[h * head_dim:(h + 1) * head_dim])
        graph.add_owned_member(qkv, "in", x.atoms, node)
        graph.add_owned_member(qkv, "out", x.atoms * 3, node)  # (3, heads, head_dim) rows, as the code splits them
        graph.add_owned_member(proj, "in", x.atoms, node)
        graph.add_owned_member(proj, "out", x.atoms, node)
        return x

    def run_masked(self, masker, node, args, kwargs):
        info = masker.dependencies.channels(node.args[0])
        if self._layers(masker.dependencies, node) is None or info.axis != args[0].dim() - 1:
            return masker.run_unmasked(node, args, kwargs)
        kept = masker.keep(info).nonzero().flatten()
        rows = torch.cat([kept + i * len(info.atoms) for i in range(3)])
        slices = {self._QKV: lambda w: w[rows][:, kept], self._PROJ: lambda w: w[kept][:, kept],
                  self._BIASES[0]: lambda b: b[rows], self._BIASES[1]: lambda b: b[kept]}
        args, kwargs = list(args), dict(kwargs)
        args[0] = args[0][..., kept]
        for (i, name), cut in slices.items():
            if len(args) > i and args[i] is not None:
                args[i] = cut(args[i])
            elif kwargs.get(name) is not None:
                kwargs[name] = cut(kwargs[name])
        out = node.target(*args, **kwargs)
        full = out.new_zeros(out.shape[:-1] + (len(info.atoms),))
        full[..., kept] = out
        return full
