"""Dependency graph, physical removal and exactness against the masked original.

"Masked original" (used throughout): the *unpruned* model, traced with torch.fx,
in which every intermediate tensor (after every conv, BN, activation, add,
concat, split, flatten...) has the channels of the removed units multiplied by
zero (:func:`pycompress.prune.masked_forward`). Removing a unit physically must
give exactly that function: we compare in float64 with ``atol=1e-10``, with
random BatchNorm statistics so a zeroed conv output does not stay zero after BN.
"""

import copy
import io

import pytest
import torch
from torch import nn

from pycompress.models import ConcatNet, MobileNetStyle, ResNetStyle, VGGStyle
from pycompress.prune import (CRITERIA, L1, DependencyGraph, FineTune, Iterative, OneShot, Phased, Pruner, Target,
                              count_params_flops, get_criterion, load_pruned_state_dict, masked_forward, plan_removal,
                              prune)

TINY = {
    "vgg": lambda: VGGStyle(widths=(4, 8, 8), hidden=8),
    "resnet": lambda: ResNetStyle(width=4, blocks=(2, 1)),
    "mobilenet": lambda: MobileNetStyle(width=4),
    "concat": lambda: ConcatNet(width=4),
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.double().eval()


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("criterion", sorted(c for c in CRITERIA if c != "singh"))
@pytest.mark.parametrize("name", sorted(TINY))
def test_pruned_equals_masked_original(name, criterion):
    torch.manual_seed(0)
    model = _randomize(TINY[name]())
    x, y = _inputs()
    graph = DependencyGraph(model, x)
    scores = get_criterion(criterion).scores(graph, data=[(x, y)])
    units, reached = plan_removal(graph, scores, target_params=int(0.6 * graph.cost()[0]))
    assert reached and units
    reference = masked_forward(graph, units, x)
    predicted = graph.cost(units)
    graph.remove(units)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, reference, rtol=0, atol=1e-10)
    assert count_params_flops(model, x) == predicted  # analytic cost == measured cost
    buffer = io.BytesIO()  # and it saves and reloads (weights only) into a fresh model of its class
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = load_pruned_state_dict(TINY[name]().double(), torch.load(buffer, weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), out)


def test_singh_pruned_equals_masked_original():
    torch.manual_seed(0)
    model = _randomize(TINY["resnet"]())
    x, _ = _inputs()
    graph = DependencyGraph(model, x)
    with torch.no_grad():  # what sparsity induction + thresholding leaves behind
        for conv in (model.stem[0], model.stages[0].conv2, model.stages[1].conv2):  # every producer of the trunk
            conv.weight[:2] = 0
        model.stages[0].conv1.weight[1] = 0  # and one inner filter
    crit = get_criterion("singh")
    flagged = crit.unimportant(crit.scores(graph))
    units = [graph.groups[gi].units[p] for gi, pos in flagged.items() for p in pos.tolist()]
    assert len(units) == 3
    reference = masked_forward(graph, units, x)
    graph.remove(units)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(TINY))
def test_prune_api_saves_reloads_and_exports(name, tmp_path):
    torch.manual_seed(0)
    model = TINY[name]().eval()
    x = torch.rand(2, 1, 8, 8)
    pruned = prune(model, x, "l1", OneShot(), Target(params=0.5, round_to=2)).eval()
    assert count_params_flops(pruned, x)[0] <= 0.5 * count_params_flops(model, x)[0]
    assert type(pruned) is type(model)
    with torch.no_grad():
        expected = pruned(x)
    # whole-module pickle
    torch.save(pruned, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    # weights only, rebuilt from the constructor
    torch.save(pruned.state_dict(), tmp_path / "sd.pt")
    rebuilt = load_pruned_state_dict(TINY[name](), torch.load(tmp_path / "sd.pt", weights_only=True)).eval()
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        assert torch.equal(again(x), expected)
        assert torch.equal(rebuilt(x), expected)
        assert torch.allclose(exported.module()(x), expected, atol=1e-6)


def test_round_to_keeps_multiples():
    model = VGGStyle(widths=(16, 16), hidden=16, input_size=8)
    x = torch.rand(1, 1, 8, 8)
    pruned = prune(model, x, "l2", OneShot(), Target(params=0.4, round_to=4))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 4 == 0 for c in convs)
    assert pruned.classifier[1].out_features % 4 == 0


def test_max_layer_ratio_caps_every_group():
    model = VGGStyle(widths=(10, 10), hidden=10)
    x = torch.rand(1, 1, 8, 8)
    pruned = prune(model, x, "random", OneShot(), Target(params=0.01, max_layer_ratio=0.5))
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [5, 5, 5, 5]


def test_channel_ratio_halves_every_group():
    model = ResNetStyle(width=8, blocks=(1, 1))
    x = torch.rand(1, 1, 8, 8)
    pruned = prune(model, x, "l1", OneShot(), Target(channels=0.5))
    assert pruned.stem[0].out_channels == 4 and pruned.stages[1].conv1.out_channels == 8


def test_ignored_layers_are_untouched():
    model = VGGStyle(widths=(8, 8), hidden=8)
    x = torch.rand(1, 1, 8, 8)
    pruned = prune(model, x, "l1", OneShot(), Target(params=0.3), ignored_layers=["features.0.0"])
    assert pruned.features[0][0].out_channels == 8
    assert pruned.features[1][0].out_channels < 8


# ------------------------------------------------------------------ group structure
def _members(group):
    return {str(m): group.flat(m) for m in group.members}


def test_residual_group_couples_every_branch_of_the_adds():
    model = ResNetStyle(width=4, blocks=(2, 1))
    g = DependencyGraph(model, torch.rand(1, 1, 8, 8))
    trunk = g.group_of("stem.0.out")
    r = list(range(4))
    assert _members(trunk) == {
        "stem.0.out": r, "stem.1.bn": r,
        "stages.0.conv1.in": r, "stages.0.conv2.out": r, "stages.0.bn2.bn": r,
        "stages.1.conv1.in": r, "stages.1.conv2.out": r, "stages.1.bn2.bn": r,
        "stages.2.conv1.in": r, "stages.2.shortcut.0.in": r,
    }
    # the projection shortcut starts a new trunk, coupled with the next block's output and the head
    second = g.group_of("stages.2.shortcut.0.out")
    assert set(_members(second)) == {"stages.2.conv2.out", "stages.2.bn2.bn", "stages.2.shortcut.0.out",
                                     "stages.2.shortcut.1.bn", "fc.in"}
    inner = g.group_of("stages.0.conv1.out")
    assert _members(inner) == {"stages.0.conv1.out": r, "stages.0.bn1.bn": r, "stages.0.conv2.in": r}
    assert g.group_of("fc.out").locked and g.group_of("stem.0.in").locked


def test_concat_groups_carry_channel_offsets():
    model = ConcatNet(width=4)  # block1 branches: 4 + 4 + 2 channels
    g = DependencyGraph(model, torch.rand(1, 1, 8, 8))
    assert _members(g.group_of("block1.branch1.0.out"))["down.0.in"] == [0, 1, 2, 3]
    assert _members(g.group_of("block1.branch3.1.0.out"))["down.0.in"] == [4, 5, 6, 7]
    assert _members(g.group_of("block1.branch_pool.1.0.out"))["down.0.in"] == [8, 9]
    stem = _members(g.group_of("stem.0.out"))  # one input read by three branches (one after a max-pool)
    assert {"block1.branch1.0.in", "block1.branch3.0.0.in", "block1.branch_pool.1.0.in"} <= set(stem)
    # block2's concat feeds the Linear head with offsets 0, 8, 16
    assert _members(g.group_of("block2.branch3.1.0.out"))["fc.in"] == list(range(8, 16))
    assert _members(g.group_of("block2.branch_pool.1.0.out"))["fc.in"] == list(range(16, 20))


def test_depthwise_conv_joins_its_input_group():
    g = DependencyGraph(MobileNetStyle(width=4), torch.rand(1, 1, 8, 8))
    assert set(_members(g.group_of("features.0.0.out"))) == {
        "features.0.0.out", "features.0.1.bn", "features.1.0.dw", "features.1.1.bn", "features.2.0.in"}


def test_flatten_to_linear_maps_each_channel_to_its_spatial_block():
    g = DependencyGraph(VGGStyle(widths=(4, 6), hidden=8), torch.rand(1, 1, 8, 8))  # 6 maps of 2x2
    group = g.group_of("features.4.0.out")
    assert group.indices[next(m for m in group.members if str(m) == "classifier.1.in")][1] == [4, 5, 6, 7]


class ChunkNet(nn.Module):
    """chunk on channels, per-piece convs, chunk again, concat in swapped order, gated by a mul."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b1 = nn.Conv2d(3, 3, 1)
        self.b2 = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x):
        p, q = torch.relu(self.a(x)).chunk(2, dim=1)
        z = torch.cat([self.b2(q), self.b1(p)], dim=1)
        u, v = torch.chunk(z, 2, 1)
        z = torch.cat([v, u], 1) * torch.sigmoid(z)
        out = torch.nn.functional.avg_pool2d(self.c(z), 4)
        return self.head(out.view(out.size(0), -1))


def test_chunk_concat_offsets_are_exact():
    torch.manual_seed(0)
    model = ChunkNet().double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    g = DependencyGraph(model, x)
    # chunk(2) couples a's channel i with channel i + 3, so both pieces shrink alike
    assert _members(g.group_of("a.out")) == {"a.out": [0, 3, 1, 4, 2, 5], "b2.in": [0, 1, 2], "b1.in": [0, 1, 2]}
    # cat-chunk-swap-mul couples b2's channel i with b1's channel i; c reads them at i + 3 and i
    assert _members(g.group_of("b2.out")) == {"b2.out": [0, 1, 2], "b1.out": [0, 1, 2], "c.in": [0, 3, 1, 4, 2, 5]}
    c = g.group_of("c.out")
    assert c.indices[next(m for m in c.members if m.kind == "in")][2] == [8, 9, 10, 11]  # 2x2 map after the view
    units = [g.group_of("a.out").units[1], g.group_of("b2.out").units[2], c.units[0]]
    reference = masked_forward(g, units, x)
    g.remove(units)
    assert (model.a.out_channels, model.b1.out_channels, model.c.in_channels, model.head.in_features) == \
        (4, 2, 4, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-10)


class HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        p, q = torch.split(self.a(x), [2, 4], dim=1)
        return self.fc(self.c(q).view(-1, 8)), self.d(self.b(p))


def test_hard_coded_split_and_view_sizes_lock_their_channels():
    g = DependencyGraph(HardCoded(), torch.rand(1, 1, 2, 2))
    assert g.group_of("a.out").locked and "split sizes are hard-coded" in g.group_of("a.out").reason
    assert g.group_of("c.out").locked and "hard-coded in node 'view' (it counts merged positions" in \
        g.group_of("c.out").reason
    assert not g.group_of("b.out").locked


def test_grouped_conv_couples_each_position_of_its_groups():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(8, 4, 1))
    g = DependencyGraph(model, torch.rand(1, 1, 6, 6))
    assert [idx for m, idx in g.group_of("0.out").indices.items() if str(m) == "2.in"] == [[[0, 4], [1, 5],
                                                                                              [2, 6], [3, 7]]]
    assert not g.group_of("4.in").locked and g.group_of("4.in") is g.group_of("2.out")


# ------------------------------------------------------------------ refusals (one per bad input)
class Roller(nn.Module):
    """Rolling the channels has no rule (a transpose, which this test used before, now has one)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.roll(self.conv(x), 1, dims=1)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.stem = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return self.conv(self.conv(self.stem(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class Slicer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return self.conv(x)[:, :2]


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("model, node", [(Roller(), "roll"), (Twice(), "conv_1"), (Slicer(), "getitem"),
                                         (WithLayerNorm(), "norm")])
def test_unsupported_pattern_is_refused_naming_the_node(model, node):
    with pytest.raises(ValueError, match=f"node '{node}'"):
        DependencyGraph(model, torch.rand(1, 1, 4, 4))


def test_untraceable_model_is_refused():
    with pytest.raises(ValueError, match="could not trace"):
        DependencyGraph(Branchy(), torch.rand(1, 1, 4, 4))


def test_bad_graph_arguments():
    model = VGGStyle(widths=(4,), hidden=4)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(TypeError, match="model"):
        DependencyGraph("vgg", x)
    with pytest.raises(TypeError, match="example_inputs"):
        DependencyGraph(model, [1, 2])
    with pytest.raises(ValueError, match="ignored_layers"):
        DependencyGraph(model, x, ignored_layers=["nope"])
    g = DependencyGraph(model, x)
    with pytest.raises(ValueError, match="locked"):
        g.remove([g.group_of("classifier.3.out").units[0]])
    with pytest.raises(ValueError, match="no channel"):
        g.remove(g.group_of("features.0.0.out").units)
    with pytest.raises(ValueError, match="member"):
        g.group_of("nothing.out")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_prune_arguments():
    """The deprecated keyword form (kept for one release) still validates every argument."""
    model = VGGStyle(widths=(4,), hidden=4)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        prune(model, x, "l1")
    with pytest.raises(ValueError, match="exactly one"):
        prune(model, x, "l1", target_params=0.5, target_flops=0.5)
    with pytest.raises(ValueError, match="target_params"):
        prune(model, x, "l1", target_params=1.5)
    with pytest.raises(ValueError, match="channel_ratio"):
        prune(model, x, "l1", channel_ratio=1.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        prune(model, x, "magic", target_params=0.5)
    with pytest.raises(ValueError, match="needs train_data"):
        prune(model, x, "taylor", target_params=0.5)
    with pytest.raises(ValueError, match="steps"):
        prune(model, x, "l1", target_params=0.5, steps=0)
    with pytest.raises(ValueError, match="round_to"):
        prune(model, x, "l1", target_params=0.5, round_to=0)
    with pytest.raises(ValueError, match="fine_tune_steps > 0 needs train_data"):
        prune(model, x, "l1", target_params=0.5, fine_tune_steps=3)
    with pytest.raises(ValueError, match="singh needs|needs train_data"):
        prune(model, x, "singh", target_params=0.5)


def test_prune_does_not_modify_the_input_model():
    model = VGGStyle(widths=(4, 4), hidden=4)
    before = copy.deepcopy(model.state_dict())
    prune(model, torch.rand(1, 1, 8, 8), "l1", OneShot(), Target(params=0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_pruned_state_dict_rejects_non_dict():
    with pytest.raises(TypeError, match="state_dict"):
        load_pruned_state_dict(VGGStyle(), io.BytesIO())


def test_old_keyword_form_warns_and_prunes_like_the_new_form():
    model = VGGStyle(widths=(8, 8), hidden=8)
    x = torch.rand(1, 1, 8, 8)
    with pytest.deprecated_call(match="deprecated"):
        old = prune(model, x, "l1", target_params=0.5, round_to=2, steps=2)
    new = prune(model, x, "l1", Iterative(2), Target(params=0.5, round_to=2))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_pruner_steps_one_at_a_time():
    model = VGGStyle(widths=(8, 8), hidden=8)
    x = torch.rand(1, 1, 8, 8)
    pruner = Pruner(model, x, L1(), Iterative(3), Target(params=0.4))
    first = pruner.step()
    assert first["step"] == 1 and pruner.history == [first] and not pruner.done
    assert pruner.run() is model and [h["step"] for h in pruner.history] == [1, 2, 3]
    assert pruner.step() is None and pruner.done
    assert count_params_flops(model, x)[0] <= 0.4 * pruner.dense_params


def test_bad_engine_arguments():
    model = VGGStyle(widths=(4,), hidden=4)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        Target()
    with pytest.raises(ValueError, match="Target.params"):
        Target(params=1.5)
    with pytest.raises(ValueError, match="round_to"):
        Target(params=0.5, round_to=0)
    with pytest.raises(ValueError, match="steps"):
        Iterative(0)
    with pytest.raises(TypeError, match="fine_tune"):
        Iterative(2, fine_tune=3)
    with pytest.raises(TypeError, match="schedule"):
        Pruner(model, x, L1(), "one-shot", Target(params=0.5))
    with pytest.raises(TypeError, match="target"):
        Pruner(model, x, L1(), OneShot(), 0.5)
    with pytest.raises(ValueError, match="target is required"):
        prune(model, x, "l1", OneShot())
    with pytest.raises(TypeError, match="not both"):
        prune(model, x, "l1", OneShot(), Target(params=0.5), steps=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        prune(model, x, "l1", OneShot(), Target(params=0.5), stepz=2)
    with pytest.raises(ValueError, match="needs train_data"):
        prune(model, x, "taylor", OneShot(), Target(params=0.5))
    with pytest.raises(ValueError, match="fine_tune_steps > 0 needs train_data"):
        prune(model, x, "l1", OneShot(fine_tune=FineTune(steps=3)), Target(params=0.5))
    with pytest.raises(TypeError, match="flags unimportant units"):
        prune(model, x, "l1", Phased(), Target(params=0.5), train_data=[0], val_data=[0])
