"""Channel dependency graph and physical channel removal.

Why torch.fx and not autograd: channel coupling is a *static* property of the
program (which tensors are added, concatenated, split or flattened). A symbolic
trace gives every operation as a named node with its module path, so a refusal
can say exactly which node is unsupported, and it runs without gradients.
Autograd tracing sees only the backward functions of one concrete run and loses
module names. The price is that models with data-dependent Python control flow
cannot be traced; they are refused with fx's own message.

The model
---------
Every channel of every intermediate tensor is an *atom* (an integer). Layers
that create channels (Conv, Linear, the graph inputs) create fresh atoms;
BatchNorm, activations, pooling, dropout and depthwise convs pass them through;
``torch.cat`` on the channel axis concatenates the atom lists (so channel
offsets come for free); ``split``/``chunk`` slice them; ``flatten``/``view``
before a Linear repeats each atom once per spatial position; residual ``+``
(and ``*``, ``-``) unions the two operands' atoms position by position
(union-find). After propagation every union-find class is one *unit*: a set of
channel indices, in several layers, that can only be removed together.

Units that touch the same set of layer dimensions (the same *members*) form a
:class:`Group`, e.g. ``conv1.out, bn1, conv2.in``. For a residual stage the
group spans every conv output and every BN that feeds the adds; for a concat,
the group of one branch carries that branch's channel offset in the consuming
conv's input. Units that reach a graph input or output, an ignored layer or a
grouped (non-depthwise) conv are *locked*: never pruned.

Removing units rewrites the modules in place (new, smaller Parameters and
buffers); the model stays an ordinary ``nn.Module`` of its own class, so it can
be ``torch.save``-d, reloaded (see :func:`load_pruned_state_dict`) and
``torch.export``-ed. The pruned model computes exactly what the original
computes when every pruned channel of every intermediate tensor is set to zero
(:func:`masked_forward`).
"""

import math
import operator
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["DependencyGraph", "Group", "Member", "masked_forward", "count_params_flops", "load_pruned_state_dict"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel independently (or not on channels at all).
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                 nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
                 nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_PASS_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                   F.hardswish, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.max_pool1d, F.max_pool2d,
                   F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.dropout, F.dropout2d}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone"}
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                          torch.add, torch.sub, torch.mul}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split"}
_SHAPE_METHODS = {"size", "dim"}


@dataclass(frozen=True, order=True)
class Member:
    """One prunable tensor dimension of one module.

    ``kind`` is ``"out"`` (output channels / features of a Conv or Linear),
    ``"in"`` (input channels / features of a Conv or Linear), ``"bn"``
    (BatchNorm features) or ``"dw"`` (channels of a depthwise conv, in = out).
    """

    module: str
    kind: str

    def __str__(self):
        return f"{self.module}.{self.kind}"


class Group:
    """Coupled channels: removing unit ``u`` removes ``indices[member][u]`` from every member.

    Attributes:
        units (list[int]): the union-find roots, in channel order of the first member.
        indices (dict[Member, list[list[int]]]): per member, per unit, the indices of
            that dimension to remove (several for a Linear fed by a flatten).
        locked (bool): True if the group may not be pruned; ``reason`` says why.
    """

    def __init__(self, units: List[int], indices: Dict[Member, List[List[int]]], locked: bool, reason: str):
        self.units = units
        self.indices = indices
        self.locked = locked
        self.reason = reason

    @property
    def members(self) -> List[Member]:
        """The members in graph order."""
        return list(self.indices)

    @property
    def name(self) -> str:
        """The first producing layer (``out``/``dw`` member) names the group; else the first member."""
        for m in self.members:
            if m.kind in ("out", "dw"):
                return str(m)
        return str(self.members[0])

    def flat(self, member: Member) -> List[int]:
        """All indices of ``member`` touched by this group, in unit order."""
        return [i for idx in self.indices[member] for i in idx]

    def __len__(self):
        return len(self.units)

    def __repr__(self):
        parts = ", ".join(f"{m}[{_ranges(self.flat(m))}]" for m in self.members)
        return f"Group({len(self)} units{', locked: ' + self.reason if self.locked else ''}: {parts})"


def _ranges(idx: Sequence[int]) -> str:
    if idx and list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return f"{idx[0]}:{idx[0] + len(idx)}"
    return ",".join(map(str, idx[:8])) + (",..." if len(idx) > 8 else "")


@dataclass
class _Chan:
    """Channel information of one tensor: which atom sits at each index of ``axis``."""

    axis: int
    atoms: List[int]


def _meta(node) -> Optional[TensorMetadata]:
    m = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return m if isinstance(m, TensorMetadata) else None


def _target_str(node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of Tensors, got {type(example_inputs).__name__}")


class DependencyGraph:
    """Traces ``model`` with torch.fx and groups its coupled channels.

    Args:
        model (nn.Module): the model; traced, never modified by construction.
            :meth:`remove` later rewrites its modules in place.
        example_inputs (Tensor | tuple[Tensor]): inputs for shape propagation
            (run once in eval mode under ``no_grad``; BN statistics are untouched).
        ignored_layers (iterable of nn.Module or str): layers whose input and
            output channels are never pruned.

    Raises:
        ValueError: when the model cannot be traced, a module is called more than
            once, or a node changes channels in a way the graph does not model; the
            message names the node.

    Example:
        >>> g = DependencyGraph(model, torch.randn(1, 1, 8, 8))
        >>> group = g.prunable_groups()[0]
        >>> g.remove({group.units[0]})   # physically removes one channel everywhere
    """

    def __init__(self, model: nn.Module, example_inputs, ignored_layers: Iterable = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.example_inputs = _as_tuple(example_inputs)
        names = {m: n for n, m in model.named_modules()}
        self.ignored = set()
        for layer in ignored_layers:
            if isinstance(layer, str):
                if layer not in dict(model.named_modules()):
                    raise ValueError(f"ignored_layers: no module named {layer!r} in the model")
                self.ignored.add(layer)
            elif isinstance(layer, nn.Module):
                if layer not in names:
                    raise ValueError(f"ignored_layers: {type(layer).__name__} is not a submodule of the model")
                self.ignored.add(names[layer])
            else:
                raise TypeError(f"ignored_layers must hold nn.Module or str, got {type(layer).__name__}")
        try:
            self.gm = torch.fx.symbolic_trace(model)
        except Exception as e:  # fx raises many types (TraceError, TypeError, ...); re-raise one with context
            raise ValueError(f"torch.fx could not trace {type(model).__name__} (data-dependent control flow?): "
                             f"{e}") from e
        was_training = model.training
        model.eval()  # shape propagation must not update BatchNorm running statistics
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*self.example_inputs)
        finally:
            model.train(was_training)
        self._parent: List[int] = []
        self._locked: List[bool] = []
        self._lock_reason: Dict[int, str] = {}
        self._member_atoms: Dict[Member, List[int]] = {}
        self._info: Dict[str, object] = {}
        self._modules: Dict[str, Tuple[nn.Module, torch.fx.Node]] = {}
        for node in self.gm.graph.nodes:
            self._info[node.name] = self._visit(node)
        self._build_groups()

    # ----------------------------------------------------------------- union-find
    def _new(self, n: int, locked: str = "") -> List[int]:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._locked.extend([bool(locked)] * n)
        if locked:
            for a in range(start, start + n):
                self._lock_reason[a] = locked
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _union(self, a: int, b: int):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            self._locked[ra] = self._locked[ra] or self._locked[rb]
            self._lock_reason.setdefault(ra, self._lock_reason.get(rb, ""))

    def _lock(self, atoms: Iterable[int], reason: str):
        for a in atoms:
            r = self.find(a)
            if not self._locked[r]:
                self._locked[r] = True
                self._lock_reason[r] = reason

    # ----------------------------------------------------------------- propagation
    def _refuse(self, node, why: str):
        raise ValueError(f"cannot prune through node '{node.name}' ({node.op} {_target_str(node)}): {why}. "
                         "Supported: Conv (incl. depthwise), BatchNorm, Linear, elementwise activations, pooling, "
                         "dropout, residual add/sub/mul, cat/split/chunk, flatten/view/reshape before a Linear.")

    def _chan_of(self, arg):
        return self._info.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def _input_chan(self, node) -> _Chan:
        info = self._chan_of(node.args[0]) if node.args else None
        if not isinstance(info, _Chan):
            self._refuse(node, "its input carries no traced channels")
        return info

    def _add_member(self, module: str, kind: str, atoms: List[int]):
        self._member_atoms[Member(module, kind)] = list(atoms)

    def _visit(self, node):
        meta = _meta(node)
        if node.op == "placeholder":
            if meta is None or len(meta.shape) < 2:
                return None
            return _Chan(1, self._new(meta.shape[1], locked="graph input"))
        if node.op == "get_attr":
            return None
        if node.op == "output":
            self._lock_outputs(node.args[0])
            return None
        if node.op == "call_module":
            return self._visit_module(node, meta)
        return self._visit_function(node, meta)

    def _lock_outputs(self, value):
        if isinstance(value, torch.fx.Node):
            info = self._info.get(value.name)
            for c in (info if isinstance(info, tuple) else (info,)):
                if isinstance(c, _Chan):
                    self._lock(c.atoms, "graph output")
        elif isinstance(value, (tuple, list)):
            for v in value:
                self._lock_outputs(v)
        elif isinstance(value, dict):
            for v in value.values():
                self._lock_outputs(v)

    def _visit_module(self, node, meta):
        name = node.target
        m = self.gm.get_submodule(name)
        if name in self._modules:
            self._refuse(node, f"module '{name}' is called more than once; its channels would be coupled to "
                               "several inputs at once")
        self._modules[name] = (m, node)
        ignored = name in self.ignored
        if isinstance(m, _CONV):
            x = self._input_chan(node)
            if x.axis != 1 or len(x.atoms) != m.in_channels:
                self._refuse(node, f"expected {m.in_channels} channels on dim 1, found {len(x.atoms)} on "
                                   f"dim {x.axis}")
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            if depthwise and not ignored:
                self._add_member(name, "dw", x.atoms)
                return _Chan(1, x.atoms)
            if m.groups > 1 or ignored:
                why = "ignored layer" if ignored else f"grouped conv (groups={m.groups})"
                self._lock(x.atoms, why)
                return _Chan(1, self._new(m.out_channels, locked=why))
            self._add_member(name, "in", x.atoms)
            out = self._new(m.out_channels)
            self._add_member(name, "out", out)
            return _Chan(1, out)
        if isinstance(m, _BN):
            x = self._input_chan(node)
            if x.axis != 1 or len(x.atoms) != m.num_features:
                self._refuse(node, f"expected {m.num_features} features on dim 1")
            self._add_member(name, "bn", x.atoms)
            if ignored:
                self._lock(x.atoms, "ignored layer")
            return x
        if isinstance(m, nn.Linear):
            x = self._input_chan(node)
            if x.axis != len(meta.shape) - 1 or len(x.atoms) != m.in_features:
                self._refuse(node, f"a Linear needs its {m.in_features} traced features on the last dim")
            if ignored:
                self._lock(x.atoms, "ignored layer")
                return _Chan(x.axis, self._new(m.out_features, locked="ignored layer"))
            self._add_member(name, "in", x.atoms)
            out = self._new(m.out_features)
            self._add_member(name, "out", out)
            return _Chan(x.axis, out)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, meta)
        if isinstance(m, _PASS_MODULES):
            x = self._input_chan(node)
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self._refuse(node, "PReLU with per-channel parameters is not rewritten")
            if ignored:
                self._lock(x.atoms, "ignored layer")
            return x
        if any(isinstance(self._chan_of(a), (_Chan, tuple)) for a in node.all_input_nodes):
            self._refuse(node, f"module type {type(m).__name__} is not supported")
        return None

    def _visit_function(self, node, meta):
        op, t = node.op, node.target
        inputs = [self._chan_of(a) for a in node.all_input_nodes]
        if not any(isinstance(i, (_Chan, tuple)) for i in inputs):
            return None  # no channels involved (shapes, constants)
        is_fn = op == "call_function"
        if (is_fn and t in _PASS_FUNCTIONS) or (op == "call_method" and t in _PASS_METHODS):
            return self._input_chan(node)
        if (is_fn and t in _ELEMENTWISE_FUNCTIONS) or (op == "call_method" and t in _ELEMENTWISE_METHODS):
            return self._elementwise(node, meta)
        if (is_fn and t in _RESHAPE_FUNCTIONS) or (op == "call_method" and t in _RESHAPE_METHODS):
            return self._reshape(node, meta)
        if is_fn and t is torch.cat:
            return self._cat(node, meta)
        if (is_fn and t in _SPLIT_FUNCTIONS) or (op == "call_method" and t in _SPLIT_METHODS):
            return self._split(node)
        if is_fn and t is operator.getitem:
            src = self._chan_of(node.args[0])
            if isinstance(src, tuple) and isinstance(node.args[1], int):
                return src[node.args[1]]
            self._refuse(node, "indexing a tensor that carries channels")
        if op == "call_method" and t in _REDUCE_METHODS:
            return self._reduce(node, meta)
        if (op == "call_method" and t in _SHAPE_METHODS) or (is_fn and t is getattr):
            return None
        self._refuse(node, "operation not modelled")

    def _elementwise(self, node, meta):
        chans, others = [], []
        for a in list(node.args) + list(node.kwargs.values()):
            c = self._chan_of(a)
            if isinstance(c, _Chan):
                chans.append(c)
            elif isinstance(a, torch.fx.Node):
                others.append(a)
        for a in others:  # a tensor without channel info may only broadcast over the channel axis
            am = _meta(a)
            if am is not None:
                shape = tuple(am.shape)
                ax = chans[0].axis - (len(meta.shape) - len(shape))
                if 0 <= ax < len(shape) and shape[ax] != 1:
                    self._refuse(node, f"operand '{a.name}' has untraced channels")
        first = chans[0]
        for c in chans[1:]:
            if len(c.atoms) != len(first.atoms):
                self._refuse(node, "operands carry different channel counts")
            for a, b in zip(first.atoms, c.atoms):
                self._union(a, b)
        return _Chan(first.axis, first.atoms)

    def _reshape(self, node, meta):
        x = self._input_chan(node)
        in_shape = tuple(_meta(node.args[0]).shape)
        out_shape = tuple(meta.shape)
        a = x.axis
        if node.target in ("view", "reshape", torch.reshape):
            # a literal size on the channel dim (``x.view(n, 512)``) would be wrong once channels go
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
                else node.args[1:]
            if a < len(shape) and isinstance(shape[a], int) and shape[a] != -1:
                self._lock(x.atoms, f"size {shape[a]} is hard-coded in node '{node.name}'")
        if out_shape == in_shape:
            return x
        if out_shape[:a + 1] == in_shape[:a + 1] and math.prod(out_shape[a + 1:]) == math.prod(in_shape[a + 1:]):
            return x  # only the trailing (spatial) dims change
        if (len(out_shape) == a + 1 and out_shape[:a] == in_shape[:a]
                and out_shape[a] == math.prod(in_shape[a:])):
            spatial = math.prod(in_shape[a + 1:])  # channel-major flatten: index = c * spatial + s
            return _Chan(a, [atom for atom in x.atoms for _ in range(spatial)])
        self._refuse(node, f"reshape {in_shape} -> {out_shape} mixes the channel dim with others")

    def _cat(self, node, meta):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        chans = [self._chan_of(t) for t in tensors]
        if not all(isinstance(c, _Chan) for c in chans):
            self._refuse(node, "concatenating a tensor whose channels are not traced")
        dim = dim % len(meta.shape)
        if any(c.axis != chans[0].axis for c in chans):
            self._refuse(node, "inputs carry channels on different dims")
        if dim == chans[0].axis:
            return _Chan(dim, [a for c in chans for a in c.atoms])
        return self._elementwise_union(node, chans)

    def _elementwise_union(self, node, chans):
        for c in chans[1:]:
            if len(c.atoms) != len(chans[0].atoms):
                self._refuse(node, "inputs carry different channel counts")
            for a, b in zip(chans[0].atoms, c.atoms):
                self._union(a, b)
        return chans[0]

    def _split(self, node):
        """Pieces along the channel axis. ``chunk`` into equal pieces couples the pieces position
        by position, so every piece loses the same channels and ``chunk(n)`` still splits at the
        right place after pruning. ``split``/``tensor_split`` carry literal sizes in the model's
        code, which pruning cannot rewrite: their channels are locked (never pruned)."""
        x = self._input_chan(node)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        outs = node.meta.get("tensor_meta")
        if not isinstance(outs, (tuple, list)):
            self._refuse(node, "split output shapes unknown")
        ndim = len(outs[0].shape)
        if dim % ndim != x.axis:
            return tuple(x for _ in outs)
        sizes = [o.shape[x.axis] for o in outs]
        is_chunk = node.target in (torch.chunk, "chunk")
        if is_chunk and len(set(sizes)) == 1:
            for piece in range(1, len(sizes)):
                for i in range(sizes[0]):
                    self._union(x.atoms[i], x.atoms[piece * sizes[0] + i])
        else:
            self._lock(x.atoms, f"split sizes are hard-coded in node '{node.name}'")
        pieces, start = [], 0
        for n in sizes:
            pieces.append(_Chan(x.axis, x.atoms[start:start + n]))
            start += n
        return tuple(pieces)

    def _reduce(self, node, meta):
        x = self._input_chan(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            self._refuse(node, "a full reduction mixes channels")
        ndim = len(_meta(node.args[0]).shape)
        dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
        if x.axis in dims:
            self._refuse(node, "reducing over the channel dim")
        return _Chan(x.axis if keepdim else x.axis - sum(d < x.axis for d in dims), x.atoms)

    # ----------------------------------------------------------------- groups
    def _build_groups(self):
        per_unit: Dict[int, Dict[Member, List[int]]] = {}
        order: Dict[int, int] = {}
        pos = {n.target: i for i, n in enumerate(self.gm.graph.nodes) if n.op == "call_module"}
        for member in sorted(self._member_atoms, key=lambda m: (pos[m.module], m.kind != "in")):
            for idx, atom in enumerate(self._member_atoms[member]):
                r = self.find(atom)
                per_unit.setdefault(r, {}).setdefault(member, []).append(idx)
                order.setdefault(r, len(order))
        by_sig: Dict[frozenset, List[int]] = {}
        for r in sorted(per_unit, key=order.get):
            by_sig.setdefault(frozenset(per_unit[r]), []).append(r)
        self.groups: List[Group] = []
        for sig, units in by_sig.items():
            first = min(sig, key=lambda m: (pos[m.module], m.kind != "in"))
            units.sort(key=lambda u: min(per_unit[u][first]))
            ordered = sorted(sig, key=lambda m: (pos[m.module], m.kind != "in"))  # graph order names the group
            indices = {m: [per_unit[u][m] for u in units] for m in ordered}
            locked = any(self._locked[u] for u in units)
            reason = next((self._lock_reason.get(u, "") for u in units if self._locked[u]), "")
            self.groups.append(Group(units, indices, locked, reason))
        self.groups.sort(key=lambda g: min(order[u] for u in g.units))
        self._unit_group = {u: gi for gi, g in enumerate(self.groups) for u in g.units}

    def prunable_groups(self) -> List[Group]:
        """Groups that may be pruned (not locked)."""
        return [g for g in self.groups if not g.locked]

    def group_of(self, member: str) -> Group:
        """The group holding ``member``, written ``"module.kind"`` (e.g. ``"features.0.0.out"``)."""
        for g in self.groups:
            if any(str(m) == member for m in g.indices):
                return g
        raise ValueError(f"member must name a module dimension like 'conv1.out', got {member!r}")

    def modules(self) -> Dict[str, nn.Module]:
        """The traced modules by qualified name (Conv, BN, Linear, ...)."""
        return {n: m for n, (m, _) in self._modules.items()}

    def node_of(self, module: str) -> torch.fx.Node:
        return self._modules[module][1]

    # ----------------------------------------------------------------- removal
    def removal_indices(self, units: Iterable[int]) -> Dict[Member, List[int]]:
        """Per member, the sorted indices that removing ``units`` deletes."""
        out: Dict[Member, set] = {}
        for u in units:
            if u not in self._unit_group:
                raise ValueError(f"units: {u} is not a unit of this graph")
            g = self.groups[self._unit_group[u]]
            if g.locked:
                raise ValueError(f"units: {u} belongs to a locked group ({g.reason}): {g.name}")
            pos = g.units.index(u)
            for m, idx in g.indices.items():
                out.setdefault(m, set()).update(idx[pos])
        return {m: sorted(v) for m, v in out.items()}

    def remove(self, units: Iterable[int]):
        """Physically removes ``units`` from ``self.model`` (in place). The graph is stale afterwards.

        Raises:
            ValueError: if a unit is unknown or locked, or a dimension would drop to zero.
        """
        removal = self.removal_indices(units)
        by_module: Dict[str, Dict[str, List[int]]] = {}
        for m, idx in removal.items():
            by_module.setdefault(m.module, {})[m.kind] = idx
        for name, kinds in by_module.items():
            module = self._modules[name][0]
            for kind, idx in kinds.items():
                size = len(self._member_atoms[Member(name, kind)])
                if len(idx) >= size:
                    raise ValueError(f"units: removing them would leave {name}.{kind} with no channel")
            _shrink(module, {k: _keep(len(self._member_atoms[Member(name, k)]), v) for k, v in kinds.items()})

    # ----------------------------------------------------------------- costs
    def cost(self, units: Iterable[int] = ()) -> Tuple[int, int]:
        """``(params, flops)`` of the model once ``units`` are removed, computed without touching it.

        FLOPs are multiply-accumulates of Conv and Linear layers for one example
        (the fvcore/thop convention), as :func:`count_params_flops` measures them.
        """
        removal = self.removal_indices(units)
        gone = {m: len(v) for m, v in removal.items()}
        params = sum(p.numel() for p in self.model.parameters())
        flops = 0
        for name, (m, node) in self._modules.items():
            def n(kind, full):
                return full - gone.get(Member(name, kind), 0)
            meta = _meta(node)
            if isinstance(m, _CONV):
                k = math.prod(m.kernel_size)
                spatial = math.prod(meta.shape[2:])
                if Member(name, "dw") in self._member_atoms:
                    c = n("dw", m.out_channels)
                    new_p, mac = c * k + (c if m.bias is not None else 0), c * k * spatial
                else:
                    co, ci = n("out", m.out_channels), n("in", m.in_channels)
                    new_p = co * (ci // m.groups) * k + (co if m.bias is not None else 0)
                    mac = co * (ci // m.groups) * k * spatial
                params += new_p - sum(p.numel() for p in m.parameters(recurse=False))
                flops += mac
            elif isinstance(m, nn.Linear):
                co, ci = n("out", m.out_features), n("in", m.in_features)
                new_p = co * ci + (co if m.bias is not None else 0)
                params += new_p - sum(p.numel() for p in m.parameters(recurse=False))
                flops += co * ci * math.prod(meta.shape[1:-1])
            elif isinstance(m, _BN) and m.affine:
                params += 2 * n("bn", m.num_features) - 2 * m.num_features
        return params, flops


def _keep(size: int, removed: List[int]) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().flatten()


def _param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _shrink(m: nn.Module, keep: Dict[str, torch.Tensor]):
    """Rewrites one module to keep only the given indices of each dimension kind."""
    if isinstance(m, _CONV):
        if "dw" in keep:
            k = keep["dw"]
            m.weight = _param(m.weight, m.weight[k])
            if m.bias is not None:
                m.bias = _param(m.bias, m.bias[k])
            m.in_channels = m.out_channels = m.groups = len(k)
            return
        _shrink_weight(m, keep, "out_channels", "in_channels")
    elif isinstance(m, _BN):
        k = keep["bn"]
        if m.affine:
            m.weight = _param(m.weight, m.weight[k])
            m.bias = _param(m.bias, m.bias[k])
        if m.track_running_stats and m.running_mean is not None:
            m.running_mean = m.running_mean[k].clone()
            m.running_var = m.running_var[k].clone()
        m.num_features = len(k)
    elif isinstance(m, nn.Linear):
        _shrink_weight(m, keep, "out_features", "in_features")


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


class _MaskingInterpreter(torch.fx.Interpreter):
    def __init__(self, graph: DependencyGraph, removed: set):
        super().__init__(graph.gm)
        self.g, self.removed = graph, removed

    def _mask(self, value, info):
        if isinstance(info, _Chan) and isinstance(value, torch.Tensor):
            keep = torch.tensor([self.g.find(a) not in self.removed for a in info.atoms], dtype=value.dtype)
            shape = [1] * value.dim()
            shape[info.axis] = -1
            return value * keep.view(shape)
        if isinstance(info, tuple) and isinstance(value, (tuple, list)):
            return type(value)(self._mask(v, i) for v, i in zip(value, info))
        return value

    def run_node(self, n):
        return self._mask(super().run_node(n), self.g._info.get(n.name))


def masked_forward(graph: DependencyGraph, units: Iterable[int], *inputs):
    """Runs the *unpruned* traced model with every channel of ``units`` set to zero in every
    intermediate tensor that carries it (after convs, BNs, activations, adds, concats...).

    This is the reference the physically pruned model must reproduce exactly.
    """
    removed = {graph.find(u) for u in units}
    with torch.no_grad():
        return _MaskingInterpreter(graph, removed).run(*inputs)


def count_params_flops(model: nn.Module, example_inputs) -> Tuple[int, int]:
    """Measures ``(parameters, FLOPs per example)`` with forward hooks.

    FLOPs are multiply-accumulates of Conv (``out elements x in/groups x kernel``)
    and Linear (``out elements x in_features``) layers, divided by the batch size.
    """
    inputs = _as_tuple(example_inputs)
    total = [0]

    def hook(m, args, out):
        per_out = m.weight.shape[1] * math.prod(m.weight.shape[2:]) if isinstance(m, _CONV) else m.in_features
        total[0] += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _CONV + (nn.Linear,))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(p.numel() for p in model.parameters()), total[0] // inputs[0].shape[0]


def load_pruned_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Loads a pruned model's ``state_dict`` into a freshly constructed (unpruned) ``model``.

    Each Conv, BatchNorm and Linear whose saved weight is smaller is first shrunk
    to the saved shape (its attributes updated), then the weights are loaded.
    This reloads a pruned model with ``torch.load(weights_only=True)`` and the
    model's own constructor, without pickling classes.

    Returns:
        nn.Module: ``model``, modified in place.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    for name, m in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if key not in state_dict or not isinstance(m, _CONV + _BN + (nn.Linear,)):
            continue
        shape = tuple(state_dict[key].shape)
        if shape == tuple(m.weight.shape):
            continue
        if isinstance(m, _BN):
            _shrink(m, {"bn": torch.arange(shape[0])})
        elif isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            _shrink(m, {"dw": torch.arange(shape[0])})
        else:
            _shrink(m, {"out": torch.arange(shape[0]), "in": torch.arange(shape[1])})
    model.load_state_dict(state_dict, strict=strict)
    return model
