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
(union-find). How each op does this is its *rule* (:mod:`pycompress.prune.rules`,
a registry); this module only traces, runs the rules and builds the groups.
After propagation every union-find class is one *unit*: a set of channel
indices, in several layers, that can only be removed together.

Units that touch the same set of layer dimensions (the same *members*) form a
:class:`Group`, e.g. ``conv1.out, bn1, conv2.in``. For a residual stage the
group spans every conv output and every BN that feeds the adds; for a concat,
the group of one branch carries that branch's channel offset in the consuming
conv's input. A grouped conv couples position k of each of its groups, so every
group keeps the same number of channels. Units that reach a graph input or output
or an ignored layer are *locked*: never pruned.

Removing units rewrites the modules in place (new, smaller Parameters and
buffers), each by the :mod:`pycompress.prune.pruners` entry of its type; the model stays an ordinary ``nn.Module`` of its own class, so it can
be ``torch.save``-d, reloaded (see :func:`load_pruned_state_dict`) and
``torch.export``-ed. The pruned model computes exactly what the original
computes when every pruned channel of every intermediate tensor is set to zero
(:func:`masked_forward`).
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from pycompress.prune.pruners import pruner_for
from pycompress.prune.rules import rule_for
from pycompress.cost import example_tuple, measure_cost

__all__ = ["DependencyGraph", "Group", "Member", "Channels", "masked_forward", "count_params_flops",
           "load_pruned_state_dict"]


@dataclass(frozen=True, order=True)
class Member:
    """One prunable tensor dimension of one module.

    ``kind`` is ``"out"`` (output channels / features of a Conv or Linear),
    ``"in"`` (input channels / features of a Conv or Linear), ``"bn"``
    (BatchNorm features), ``"dw"`` (channels of a depthwise conv, in = out), or another
    kind of a registered pruner (``"norm"``, ``"embed"``). Two kinds are not a layer's:
    ``"param"`` (a parameter used as an operand; ``module`` is its name) and ``"size"`` (an
    int attribute that is a channel count; ``module`` is ``"owner.attribute"``).
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
class Channels:
    """Channel information of one tensor: which atom sits at each index of dim ``axis``."""

    axis: int
    atoms: List[int]


def _meta(node) -> Optional[TensorMetadata]:
    m = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return m if isinstance(m, TensorMetadata) else None


def _target_str(node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


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
        self.example_inputs = example_tuple(example_inputs)
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
        self._parameters: Dict[str, Tuple[int, torch.fx.Node]] = {}  # tensors shrunk as members: (dim, reader)
        self._sizes: Dict[str, Tuple[str, str, torch.fx.Node]] = {}  # int attributes that are channel counts
        self._rules: Dict[str, object] = {}
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

    def union_all(self, xs: Sequence[int], ys: Sequence[int]):
        """Couples ``xs[i]`` with ``ys[i]`` for every i."""
        for a, b in zip(xs, ys):
            self._union(a, b)

    union = _union
    new_atoms = _new
    lock = _lock
    Channels = Channels  # so rules need not import this module

    # ----------------------------------------------------------------- the helpers rules call
    def refuse(self, node, why: str):
        """Raises the ValueError that names ``node`` and says why it cannot be pruned through."""
        raise ValueError(f"cannot prune through node '{node.name}' ({node.op} {_target_str(node)}): {why}. "
                         "Support it with a rule (pycompress.prune.rules.register_rule) or keep it out of the "
                         "traced graph.")

    def channels(self, arg):
        """The channel information of an fx node argument (Channels, a tuple of them, or None)."""
        return self._info.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def input_channels(self, node, axis: Optional[int] = None) -> Channels:
        """The channels of ``node``'s first argument. A layer reading channels on ``axis`` gets fresh
        locked ones when its input is untraced (a graph input, a reshape that mixed channels);
        without ``axis`` an untraced input refuses the node."""
        arg = node.args[0] if node.args else None
        info = self.channels(arg)
        if isinstance(info, Channels):
            return info
        shape = self.shape(arg) if isinstance(arg, torch.fx.Node) else None
        if axis is None or not shape:
            self.refuse(node, "its input carries no traced channels")
        why = "graph input" if arg.op == "placeholder" else f"input of '{node.name}' is not traced"
        return Channels(axis % len(shape), self._new(shape[axis], locked=why))

    def shape(self, node) -> Optional[Tuple[int, ...]]:
        """The traced shape of a tensor-valued node."""
        meta = _meta(node)
        return tuple(meta.shape) if meta is not None else None

    def module(self, node) -> nn.Module:
        """The submodule a call_module node calls."""
        return self.gm.get_submodule(node.target)

    def add_member(self, module: str, kind: str, atoms: List[int]):
        """Declares that dimension ``kind`` of layer ``module`` holds ``atoms`` (see :class:`Member`)."""
        if pruner_for(self.gm.get_submodule(module)) is None:
            raise TypeError(f"{type(self.gm.get_submodule(module)).__name__} ('{module}') has prunable channels "
                            "but no layer pruner: register one (pycompress.prune.pruners.register_pruner)")
        self._member_atoms[Member(module, kind)] = list(atoms)

    def add_owned_member(self, module: str, kind: str, atoms: List[int], node: torch.fx.Node):
        """:meth:`add_member` for a layer fx traced through (a ``LayerNorm`` subclass calling
        ``F.layer_norm`` on its own weight): ``node`` is the call that reads its tensors."""
        layer = self.model.get_submodule(module)
        if pruner_for(layer) is None:
            raise TypeError(f"{type(layer).__name__} ('{module}') has prunable channels but no layer pruner")
        self._modules.setdefault(module, (layer, node))
        self._member_atoms[Member(module, kind)] = list(atoms)

    def add_parameter_member(self, node: torch.fx.Node, dim: int, atoms: List[int]):
        """Declares that dim ``dim`` of the parameter or buffer a ``get_attr`` node reads holds
        ``atoms`` (a layer scale, a class token, a position embedding): it shrinks with them."""
        member = Member(node.target, "param")
        if member in self._member_atoms:  # read at several places: the same channels each time
            self.union_all(self._member_atoms[member], atoms)
            return
        self._parameters[node.target] = (dim, node)
        self._member_atoms[member] = list(atoms)

    def add_size_member(self, owner: str, attr: str, atoms: List[int], node: torch.fx.Node):
        """Declares that the int attribute ``attr`` of module ``owner`` is the count of ``atoms``, a size
        the code writes into a reshape (ViT's ``hidden_dim``): removing some sets it to the count kept."""
        name = f"{owner}.{attr}" if owner else attr
        member = Member(name, "size")
        if member in self._member_atoms:  # the module is called at several places
            self.union_all(self._member_atoms[member], atoms)
            return
        self._sizes[name] = (owner, attr, node)
        self._member_atoms[member] = list(atoms)

    def size_attributes(self) -> Dict[str, Tuple[str, str]]:
        """The int attributes that are channel counts (see :meth:`add_size_member`), by member name."""
        return {name: (owner, attr) for name, (owner, attr, _) in self._sizes.items()}

    def member_size(self, member: "Member") -> int:
        """The size of a member dimension when the graph was traced."""
        return len(self._member_atoms[member])

    # ----------------------------------------------------------------- propagation
    def _visit(self, node):
        if node.op in ("placeholder", "get_attr"):  # untraced; layers reading them lock what they read
            return None
        if node.op == "output":
            self._lock_outputs(node.args[0])
            return None
        carries = any(isinstance(self.channels(a), (Channels, tuple)) for a in node.all_input_nodes)
        module = None
        if node.op == "call_module":
            module = self.module(node)
            self._record_call(node, module)
        rule = rule_for(node, module)
        if rule is None or not (carries or rule.reads_untraced):
            if carries:
                self.refuse(node, f"module type {type(module).__name__} is not supported" if module is not None
                            else "operation not modelled")
            return None
        self._rules[node.name] = rule
        out = rule.propagate(self, node)
        if module is not None and node.target in self.ignored:
            for info in [self.channels(a) for a in node.all_input_nodes] + [out]:
                for c in (info if isinstance(info, tuple) else (info,)):
                    if isinstance(c, Channels):
                        self._lock(c.atoms, "ignored layer")
        return out

    def _record_call(self, node, module: nn.Module):
        """A module with parameters or buffers ties its call sites together (one weight, several
        inputs), which is refused; a stateless one (an activation called twice) is several calls."""
        name = node.target
        if name in self._modules:
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                self.refuse(node, f"module '{name}' is called more than once; its channels would be coupled to "
                                  "several inputs at once")
            return
        self._modules[name] = (module, node)

    def _lock_outputs(self, value):
        if isinstance(value, torch.fx.Node):
            info = self._info.get(value.name)
            for c in (info if isinstance(info, tuple) else (info,)):
                if isinstance(c, Channels):
                    self._lock(c.atoms, "graph output")
        elif isinstance(value, (tuple, list)):
            for v in value:
                self._lock_outputs(v)
        elif isinstance(value, dict):
            for v in value.values():
                self._lock_outputs(v)

    # ----------------------------------------------------------------- groups
    def _build_groups(self):
        per_unit: Dict[int, Dict[Member, List[int]]] = {}
        order: Dict[int, int] = {}
        at = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        pos = {name: at[node] for name, (_, node) in list(self._modules.items()) + list(self._parameters.items())}
        pos.update({name: at[node] for name, (_, _, node) in self._sizes.items()})
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
            if name in self._parameters:
                _shrink_tensor(self.model, name, self._parameters[name][0],
                               _keep(self.member_size(Member(name, "param")), kinds["param"]))
                continue
            if name in self._sizes:
                owner, attr, _ = self._sizes[name]
                setattr(self.model.get_submodule(owner), attr,
                        self.member_size(Member(name, "size")) - len(kinds["size"]))
                continue
            module = self._modules[name][0]
            for kind, idx in kinds.items():
                size = len(self._member_atoms[Member(name, kind)])
                if len(idx) >= size:
                    raise ValueError(f"units: removing them would leave {name}.{kind} with no channel")
            pruner_for(module).shrink(module, {k: _keep(self.member_size(Member(name, k)), v)
                                               for k, v in kinds.items()})

    # ----------------------------------------------------------------- costs
    def cost(self, units: Iterable[int] = ()) -> Tuple[int, int]:
        """``(params, flops)`` of the model once ``units`` are removed, computed without touching it.

        FLOPs are multiply-accumulates of Conv and Linear layers for one example
        (the fvcore/thop convention), as :func:`count_params_flops` measures them;
        each layer's share comes from its pruner (:meth:`LayerPruner.cost`).
        """
        removed: Dict[str, Dict[str, int]] = {}
        for m, idx in self.removal_indices(units).items():
            removed.setdefault(m.module, {})[m.kind] = len(idx)
        params, flops = sum(p.numel() for p in self.model.parameters()), 0
        for name, (m, node) in self._modules.items():
            pruner = pruner_for(m)
            if pruner is None:
                continue
            meta = node.meta.get("tensor_meta")  # a layer returning a tuple (attention) is costed by its first
            shape = tuple((meta if isinstance(meta, TensorMetadata) else meta[0]).shape)
            new_params, macs = pruner.cost(m, shape, removed.get(name, {}))
            params += new_params - sum(p.numel() for p in m.parameters(recurse=False))
            flops += macs
        for name, (dim, _) in self._parameters.items():
            t = _tensor_of(self.model, name)
            if isinstance(t, nn.Parameter):
                params -= t.numel() // t.shape[dim] * removed.get(name, {}).get("param", 0)
        return params, flops


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _shrink_tensor(model: nn.Module, name: str, dim: int, keep: torch.Tensor):
    """Keeps ``keep`` along ``dim`` of the parameter or buffer ``name`` of ``model``, in place."""
    _replace_tensor(model, name, _tensor_of(model, name).detach().index_select(dim, keep).clone())


def _replace_tensor(model: nn.Module, name: str, data: torch.Tensor):
    """Sets the parameter or buffer ``name`` of ``model`` to ``data``, keeping its kind."""
    owner, _, attr = name.rpartition(".")
    module, old = model.get_submodule(owner), _tensor_of(model, name)
    setattr(module, attr, nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
            else data)


def _keep(size: int, removed: List[int]) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().flatten()


class _MaskingInterpreter(torch.fx.Interpreter):
    """Runs the traced model, zeroing the removed channels of every tensor; nodes whose rule knows
    a better reference (a LayerNorm over the kept channels) compute it through ``Rule.run_masked``."""

    def __init__(self, graph: DependencyGraph, removed: set):
        super().__init__(graph.gm)
        self.dependencies, self.removed = graph, removed

    def keep(self, info: Channels) -> torch.Tensor:
        """Bool per position of ``info.axis``: True where the channel is kept."""
        return torch.tensor([self.dependencies.find(a) not in self.removed for a in info.atoms])

    def submodule(self, node) -> nn.Module:
        return self.dependencies.module(node)

    def run_unmasked(self, node, args, kwargs):
        return getattr(self, node.op)(node.target, args, kwargs)

    def _mask(self, value, info):
        if isinstance(info, Channels) and isinstance(value, torch.Tensor):
            shape = [1] * value.dim()
            shape[info.axis] = -1
            return value * self.keep(info).to(value.dtype).view(shape)
        if isinstance(info, tuple) and isinstance(value, (tuple, list)):
            return type(value)(self._mask(v, i) for v, i in zip(value, info))
        return value

    def run_node(self, n):
        rule = self.dependencies._rules.get(n.name)
        if rule is None:
            value = super().run_node(n)
        else:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                value = rule.run_masked(self, n, args, kwargs)
        return self._mask(value, self.dependencies._info.get(n.name))


def masked_forward(graph: DependencyGraph, units: Iterable[int], *inputs):
    """Runs the *unpruned* traced model with every channel of ``units`` set to zero in every
    intermediate tensor that carries it (after convs, BNs, activations, adds, concats...).

    This is the reference the physically pruned model must reproduce exactly.
    """
    removed = {graph.find(u) for u in units}
    with torch.no_grad():
        return _MaskingInterpreter(graph, removed).run(*inputs)


def count_params_flops(model: nn.Module, example_inputs) -> Tuple[int, int]:
    """``(parameters, MACs per example)``, the pair the pruning history stores; measured by
    :func:`pycompress.cost.measure_cost` (whose ``flops`` are 2 x MACs)."""
    cost = measure_cost(model, example_inputs)
    return cost.params, cost.macs


def load_pruned_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True,
                           example_inputs=None) -> nn.Module:
    """Loads a pruned model's ``state_dict`` into a freshly constructed (unpruned) ``model``.

    Each layer with a registered pruner (Conv, BatchNorm, Linear, LayerNorm, ...)
    whose saved weight is smaller is first shrunk to the saved shape (its
    attributes updated), then the weights are loaded.
    This reloads a pruned model with ``torch.load(weights_only=True)`` and the
    model's own constructor, without pickling classes.

    Args:
        example_inputs (Tensor or tuple, optional): run once (eval mode, no grad) after
            loading, so that layer shapes which contradict each other (a conv cut to 5
            channels feeding a layer that still expects 8) fail here, naming the layer.
            They are also traced first, to find the int attributes that are channel counts
            (ViT's ``hidden_dim``, see :meth:`DependencyGraph.add_size_member`): each is set to
            the saved width of the layer or parameter that produces those channels. A model
            with such attributes reloads only with ``example_inputs``.

    Returns:
        nn.Module: ``model``, modified in place.

    Raises:
        ValueError: a saved weight larger than the model's layer, or (with
            ``example_inputs``) layer shapes that do not fit together; the layer is named.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    sizes = {} if example_inputs is None else _saved_sizes(model, state_dict, example_tuple(example_inputs))
    for name, m in model.named_modules():
        pruner = pruner_for(m)
        if pruner is None:
            continue
        key = f"{name}.{pruner.weight_name}" if name else pruner.weight_name
        if key not in state_dict:
            continue
        shape = tuple(state_dict[key].shape)
        current = tuple(getattr(m, pruner.weight_name).shape)
        if len(shape) != len(current) or any(s > c for s, c in zip(shape, current)):
            raise ValueError(f"layer {name!r}: the saved {pruner.weight_name} {shape} does not fit the model's "
                             f"{current} (a pruned model can only be smaller)")
        if shape != current:
            pruner.shrink(m, pruner.saved_keep(m, shape))
    owned = {id(t) for m in model.modules() if pruner_for(m) is not None
             for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    for key, saved in state_dict.items():  # tensors shrunk as members of their own (a class token)
        try:
            t = _tensor_of(model, key)
        except AttributeError:
            continue
        if isinstance(t, torch.Tensor) and id(t) not in owned and t.dim() == saved.dim() and t.shape != saved.shape:
            _replace_tensor(model, key, t.new_zeros(saved.shape))  # the values are loaded just below
    model.load_state_dict(state_dict, strict=strict)
    for (owner, attr), value in sizes.items():
        setattr(model.get_submodule(owner), attr, value)
    if example_inputs is not None:
        _check_shapes_fit(model, example_tuple(example_inputs))
    return model


def _saved_sizes(model: nn.Module, state_dict, example_inputs: tuple) -> Dict[Tuple[str, str], int]:
    """The values of the dense ``model``'s size attributes in the pruned model ``state_dict`` was saved
    from: the saved width of a member carrying the same channels (the layer that produces them)."""
    try:
        graph = DependencyGraph(model, example_inputs)
    except (ValueError, TypeError):  # a model the engine cannot trace has no size attributes
        return {}
    sizes = {}
    for name, (owner, attr) in graph.size_attributes().items():
        atoms = graph._member_atoms[Member(name, "size")]
        for member, held in graph._member_atoms.items():
            width = _saved_width(graph, member, state_dict) if held == atoms and member.kind != "size" else None
            if width is not None:
                sizes[(owner, attr)] = width
                break
    return sizes


def _saved_width(graph: DependencyGraph, member: Member, state_dict) -> Optional[int]:
    """How many channels ``member`` has in ``state_dict``, or None when it is not saved there."""
    if member.module in graph._parameters:
        saved = state_dict.get(member.module)
        return None if saved is None else saved.shape[graph._parameters[member.module][0]]
    module = graph.modules().get(member.module)
    pruner = pruner_for(module) if module is not None else None
    key = f"{member.module}.{pruner.weight_name}" if pruner is not None else None
    if key not in state_dict:
        return None
    return len(pruner.saved_keep(module, tuple(state_dict[key].shape))[member.kind])


def _check_shapes_fit(model: nn.Module, example_inputs: tuple):
    """One eval-mode forward; a shape error names the last prunable layer entered."""
    entered = [None]
    hooks = [m.register_forward_pre_hook(lambda _m, _args, name=name: entered.__setitem__(0, name))
             for name, m in model.named_modules() if pruner_for(m) is not None]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*example_inputs)
    except RuntimeError as e:
        raise ValueError(f"the loaded layer shapes do not fit together at layer {entered[0]!r}: {e}") from e
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
