"""Op rules for the blocks of torchvision's zoo and of the detectors, each rebuilt in plain torch.nn
(torchvision does not import beside our torch), each checked against the masked original: the
unpruned model with the removed channels zeroed (LayerNorms over the channels normalise over the
kept ones), in float64."""

import io

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pycompress.prune import (DependencyGraph, L1, OneShot, Rule, Target, get_criterion, load_pruned_state_dict,
                              masked_forward, plan_removal, prune, register_rule)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and norm affines, so a zeroed channel does not stay zero."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.double().eval()


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _prune_matches_masked(model, x, keep=0.6, seed=None):
    """Prunes ``model`` in place to ``keep`` of its parameters (L1, one shot) and checks it against the
    masked original; returns the graph (before removal) and the removed units."""
    graph = DependencyGraph(model, x)
    scores = L1().scores(graph)
    units, reached = plan_removal(graph, scores, target_params=int(keep * graph.cost()[0]))
    assert reached and units
    if seed is not None:
        torch.manual_seed(seed)
    reference = masked_forward(graph, units, x)
    graph.remove(units)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    for o, r in zip(_outputs(out), _outputs(reference)):
        assert o.shape == r.shape
        assert torch.allclose(o, r, rtol=0, atol=1e-9)
    return graph, units


def _x(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ stateless modules reused (ResNet)
class BasicBlock(nn.Module):
    """torchvision's ResNet block: one nn.ReLU instance called twice."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = BasicBlock(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def test_stateless_module_called_twice_is_two_calls():
    model = _randomize(TinyResNet())
    graph, _ = _prune_matches_masked(model, _x(2, 3, 8, 8))
    inner = graph.group_of("layer1.0.conv1.out")  # the first relu call couples nothing with the second
    assert {str(m) for m in inner.members} == {"layer1.0.conv1.out", "layer1.0.bn1.bn", "layer1.0.conv2.in"}
    assert model.layer1[0].conv1.out_channels < 8


def test_module_with_weights_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.bn(self.stem(x)))

    with pytest.raises(ValueError, match="node 'bn_1'.*called more than once"):
        DependencyGraph(Twice(), torch.rand(1, 1, 4, 4))


# ------------------------------------------------------------------ per-sample and elementwise functions
def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth, as written there (traced through here, not wrapped)."""
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class PerSample(nn.Module):
    def __init__(self, mode="row"):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.drops = nn.ModuleList([nn.Dropout(0.0), nn.Dropout2d(0.0), nn.AlphaDropout(0.0),
                                    nn.FeatureAlphaDropout(0.0)])
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        for d in self.drops:
            h = d(h)
        h = nn.functional.dropout2d(h, 0.0, self.training)
        scale = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        h = h + stochastic_depth(self.b(h) * scale, 0.5, self.mode, self.training)
        return self.c(h)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_dropout_and_per_sample_scale_pass_channels(mode):
    model = _randomize(PerSample(mode)).train()  # stochastic depth draws its mask: same seed both runs
    _prune_matches_masked(model, _x(4, 3, 6, 6), seed=3)
    assert model.a.out_channels < 8


_wrapped_calls = []


def sample_gate(x, p: float):
    """A per-sample function the user keeps opaque to fx (as torchvision does with stochastic_depth)."""
    _wrapped_calls.append(p)
    return x * (1 - p)


torch.fx.wrap("sample_gate")


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(sample_gate(self.a(x), 0.25))


def test_a_user_rule_makes_a_wrapped_function_prunable():
    with pytest.raises(ValueError, match="node 'sample_gate'.*operation not modelled.*register_rule"):
        DependencyGraph(Gated(), torch.rand(1, 3, 2, 2))

    @register_rule(sample_gate)
    class SampleGateRule(Rule):
        def propagate(self, graph, node):
            return graph.input_channels(node)

    model = _randomize(Gated())
    _prune_matches_masked(model, _x(2, 3, 4, 4))
    assert model.a.out_channels < 6 and _wrapped_calls


# ------------------------------------------------------------------ channels-last blocks (ConvNeXt)
class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: depthwise 7x7, permute to channels-last, LayerNorm and two
    Linear layers over the last dim, permute back, layer scale, stochastic depth, residual."""

    def __init__(self, dim, layer_scale=1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.fc2(self.act(self.fc1(self.norm(h))))
        h = self.layer_scale * torch.permute(h, [0, 3, 1, 2])
        return x + stochastic_depth(h, 0.1, "row", self.training)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first LayerNorm: fx traces through it to ``F.layer_norm``."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stem_norm = LayerNorm2d(8)
        self.block = CNBlock(8)
        self.head_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block(self.stem_norm(self.stem(x))).mean((2, 3))
        return self.head(self.head_norm(x))


def test_permute_with_channels_last_layernorm_and_linear(tmp_path):
    model = _randomize(TinyConvNeXt())
    x = _x(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # the layer scale (a parameter of the block) and the traced-through LayerNorm2d shrink with the trunk
    trunk = graph.group_of("stem.out")
    assert not trunk.locked and {"stem_norm.norm", "block.layer_scale.param"} <= {str(m) for m in trunk.members}
    reference = masked_forward(graph, trunk.units[:2], x)
    graph.remove(trunk.units[:2])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    assert model.block.layer_scale.shape == (6, 1, 1) and model.stem_norm.normalized_shape == (6,)
    graph, _ = _prune_matches_masked(model, x, keep=0.7)
    mlp = graph.group_of("block.fc1.out")
    assert not mlp.locked and {str(m) for m in mlp.members} == {"block.fc1.out", "block.fc2.in"}
    assert model.block.fc1.out_features < 24
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(TinyConvNeXt()), torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_layernorm_over_the_channels_prunes_and_reloads():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))
    _randomize(model)
    x = _x(5, 6)
    _prune_matches_masked(model, x)
    assert model[1].normalized_shape == (model[0].out_features,) and model[0].out_features < 8
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)).double().eval()
    reloaded = load_pruned_state_dict(fresh, torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


# ------------------------------------------------------------------ multi-head attention
class Attention(nn.Module):
    """ViT/Swin-style attention written out: qkv Linear, split into heads, scaled dot products,
    merge, output projection. ``layout`` picks how the code sizes the heads:

    - ``"heads"``: ``reshape(B, N, 3, -1, head_dim)``: head_dim fixed -> whole heads are pruned;
    - ``"head_dims"``: the head dim read from qkv's own shape -> head dims are pruned, the same in
      every head, in q, k and v;
    - ``"..._sdpa"``: the same with ``F.scaled_dot_product_attention``;
    - ``"swin"``: Swin's ``reshape(B, N, 3, heads, C // heads)`` with C the block input's width:
      the head dim follows the input, not qkv, so qkv's outputs are locked.
    """

    def __init__(self, dim, num_heads, layout):
        super().__init__()
        self.num_heads, self.head_dim, self.layout = num_heads, dim // num_heads, layout
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x)
        if self.layout.startswith("heads"):
            qkv = qkv.reshape(B, N, 3, -1, self.head_dim)
        elif self.layout.startswith("head_dims"):
            qkv = qkv.reshape(B, N, 3, self.num_heads, qkv.shape[-1] // (3 * self.num_heads))
        else:
            qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.layout.endswith("sdpa"):
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class EncoderBlock(nn.Module):
    def __init__(self, dim=8, heads=2, layout="heads"):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, layout)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


@pytest.mark.parametrize("layout", ["heads", "head_dims", "heads_sdpa", "head_dims_sdpa"])
def test_attention_prunes_heads_or_head_dims_consistently(layout, tmp_path):
    heads = layout.startswith("heads")
    model = _randomize(EncoderBlock(dim=8, heads=2, layout=layout))
    x = _x(2, 4, 5)
    graph = DependencyGraph(model, x)
    qkv = graph.group_of("attn.qkv.out")
    assert not qkv.locked
    # one unit removes the same position from q, k and v: a head (4 dims x 3) or a head dim (2 heads x 3)
    assert all(len(idx) == (12 if heads else 6) for idx in qkv.indices[next(iter(qkv.indices))])
    assert len(qkv) == (2 if heads else 4)
    reference = masked_forward(graph, qkv.units[:1], x)
    graph.remove(qkv.units[:1])
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, reference, rtol=0, atol=1e-9)
    assert model.attn.qkv.out_features == (12 if heads else 18)
    _prune_matches_masked(model, x, keep=0.8)  # and the rest of the block prunes too
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = _randomize(EncoderBlock(dim=8, heads=2, layout=layout))
    reloaded = load_pruned_state_dict(fresh, torch.load(tmp_path / "sd.pt", weights_only=True))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-9)


def test_swin_head_split_sized_from_the_block_input_locks_qkv():
    model = _randomize(EncoderBlock(dim=8, heads=2, layout="swin"))
    graph = DependencyGraph(model, _x(2, 4, 5))
    assert graph.group_of("attn.qkv.out").locked
    assert "read from the shape of a tensor with other channels" in graph.group_of("attn.qkv.out").reason
    _prune_matches_masked(model, _x(2, 4, 5), keep=0.8)  # the MLP still prunes


# ------------------------------------------------------------------ channel shuffle (ShuffleNet-V2)
def channel_shuffle(x, groups: int):
    """torchvision's, as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


def _branch(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False), nn.BatchNorm2d(cout),
                         nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                         nn.BatchNorm2d(cin), nn.Conv2d(cin, half, 1, bias=False),
                                         nn.BatchNorm2d(half), nn.ReLU())
        self.branch2 = _branch(cin if stride > 1 else half, half, stride)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.conv5(self.stage(self.conv1(x))).mean([2, 3]))


def test_channel_shuffle_prunes_the_same_positions_in_every_group():
    model = _randomize(TinyShuffleNet())
    x = _x(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    trunk = graph.group_of("stage.0.branch1.2.out")
    # the shuffle interleaves the two branches: one unit is position i of both (and 2 of the 16 trunk channels)
    assert not trunk.locked and len(trunk) == 4
    assert {str(m): trunk.indices[m][0] for m in trunk.members if m.module in ("stage.0.branch2.5", "conv5.0")} == \
        {"stage.0.branch2.5.out": [0, 4], "conv5.0.in": [0, 1, 2, 3]}
    reference = masked_forward(graph, trunk.units[:1], x)
    graph.remove(trunk.units[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    assert (model.stage[0].branch1[2].out_channels, model.stage[1].branch2[0].in_channels,
            model.conv5[0].in_channels) == (6, 6, 12)
    _prune_matches_masked(model, x, keep=0.7)


# ------------------------------------------------------------------ grouped convs (ResNeXt, RegNet)
class ResNeXtBlock(nn.Module):
    """torchvision's ResNeXt bottleneck (a grouped 3x3 between two 1x1) with RegNet-Y's
    squeeze-and-excitation after the grouped conv."""

    def __init__(self, cin=8, width=12, groups=3, cout=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.se_reduce, self.se_expand = nn.Conv2d(width, 4, 1), nn.Conv2d(4, width, 1)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        scale = torch.sigmoid(self.se_expand(self.relu(self.se_reduce(out.mean((2, 3), keepdim=True)))))
        return self.relu(self.bn3(self.conv3(out * scale)) + x)


class TinyResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.blocks = nn.Sequential(ResNeXtBlock(), ResNeXtBlock(width=16, groups=4))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_grouped_conv_prunes_the_same_positions_in_every_group(tmp_path):
    model = _randomize(TinyResNeXt())
    x = _x(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    before, after = graph.group_of("blocks.0.conv2.in"), graph.group_of("blocks.0.conv2.out")
    assert before is not after and not before.locked and not after.locked
    # 12 channels in 3 groups of 4: a unit is position k of every group, on each side separately
    assert len(before) == len(after) == 4
    assert before.indices[next(m for m in before.members if str(m) == "blocks.0.conv2.in")][1] == [1, 5, 9]
    assert {"blocks.0.bn2.bn", "blocks.0.se_reduce.in", "blocks.0.se_expand.out", "blocks.0.conv3.in"} <= \
        {str(m) for m in after.members}
    # a criterion reading the grouped conv's input columns scores unit k with column k of its filters
    block, y = model.blocks[0], torch.tensor([0, 3])
    params = [block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    w1, bn_w, bn_b, w2 = [(p * g).detach().abs() for p, g in zip(params, grads)]
    expected = torch.stack([w1[k::4].sum() + bn_w[k::4].sum() + bn_b[k::4].sum() + w2[:, k].sum() for k in range(4)])
    scores = get_criterion("taylor_weight").scores(graph, [(x, y)])[graph.groups.index(before)]
    assert torch.allclose(scores, expected, rtol=1e-9, atol=0)
    reference = masked_forward(graph, [before.units[1], after.units[2]], x)
    graph.remove([before.units[1], after.units[2]])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    conv = model.blocks[0].conv2
    assert (conv.in_channels, conv.out_channels, conv.groups, tuple(conv.weight.shape[:2])) == (9, 9, 3, (9, 3))
    _prune_matches_masked(model, x, keep=0.6)
    for block in model.blocks:
        c = block.conv2
        assert c.groups in (3, 4) and c.in_channels % c.groups == 0 and c.out_channels % c.groups == 0
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(TinyResNeXt()), torch.load(tmp_path / "sd.pt", weights_only=True),
                                      example_inputs=x)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-9)


def test_grouped_conv_with_one_channel_per_group_locks_that_side():
    # a depthwise conv with a channel multiplier: one input channel per group, two outputs
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 2, 1)).double()
    x = _x(1, 1, 5, 5)
    graph = DependencyGraph(model, x)
    assert graph.group_of("0.out").locked and "'2' has one input channel per group" in graph.group_of("0.out").reason
    outputs = graph.group_of("2.out")
    assert not outputs.locked and len(outputs) == 2
    reference = masked_forward(graph, outputs.units[:1], x)
    graph.remove(outputs.units[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    assert (model[2].out_channels, model[2].groups, model[4].in_channels) == (4, 4, 4)


# ------------------------------------------------------------------ detectors (issue 14 stand-ins)
def space_to_depth(x):
    """YOLOv2's passthrough (reorg): (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(B, 4 * C, H // 2, W // 2)


def _cbr(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))


class TinyYOLO(nn.Module):
    """Backbone, a passthrough from a finer map concatenated with the deeper one, and a head whose
    raw map ``(B, A*(5+C), H, W)`` is viewed as ``(B, A, 5+C, H, W)``: its channels are fixed."""

    anchors, classes = 2, 3

    def __init__(self):
        super().__init__()
        self.fine = nn.Sequential(_cbr(3, 6), _cbr(6, 8, 2))
        self.deep = nn.Sequential(nn.MaxPool2d(2), _cbr(8, 10), _cbr(10, 10))
        self.reduce = _cbr(8, 4)
        self.fuse = _cbr(4 * 4 + 10, 12)
        self.head = nn.Conv2d(12, self.anchors * (5 + self.classes), 1)

    def forward(self, x):
        fine = self.fine(x)
        fused = self.fuse(torch.cat([space_to_depth(self.reduce(fine)), self.deep(fine)], 1))
        out = self.head(fused)
        B, _, H, W = out.shape
        return out.view(B, self.anchors, 5 + self.classes, H, W).permute(0, 1, 3, 4, 2)


class TinySSD(nn.Module):
    """Feature maps at three scales, one classification and one box conv per map, each permuted to
    channels-last, reshaped to ``(B, -1, k)`` and concatenated across scales."""

    def __init__(self, classes=4, anchors=(2, 3, 2)):
        super().__init__()
        self.classes = classes
        self.stages = nn.ModuleList([_cbr(3, 8, 2), _cbr(8, 10, 2), _cbr(10, 12, 2)])
        self.cls = nn.ModuleList(nn.Conv2d(c, a * classes, 3, padding=1) for c, a in zip((8, 10, 12), anchors))
        self.box = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip((8, 10, 12), anchors))

    def forward(self, x):
        scores, boxes = [], []
        for stage, cls, box in zip(self.stages, self.cls, self.box):
            x = stage(x)
            B = x.shape[0]
            scores.append(cls(x).permute(0, 2, 3, 1).reshape(B, -1, self.classes))
            boxes.append(box(x).permute(0, 2, 3, 1).reshape(B, -1, 4))
        return torch.cat(scores, 1), torch.cat(boxes, 1)


@pytest.mark.parametrize("make, heads", [(TinyYOLO, ["head"]),
                                         (TinySSD, [f"{h}.{i}" for h in ("cls", "box") for i in range(3)])])
def test_detector_heads_stay_fixed_and_everything_upstream_prunes(make, heads):
    model = _randomize(make())
    x = _x(2, 3, 16, 16)
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(model(x))]
    graph = DependencyGraph(model, x)
    assert all(graph.group_of(f"{h}.out").locked for h in heads)
    upstream = [g for g in graph.groups if g.reason != "graph input"
                and not any(m.module in heads and m.kind == "out" for m in g.members)]
    assert upstream and not any(g.locked for g in upstream)
    _prune_matches_masked(model, x, keep=0.6)
    with torch.no_grad():
        assert [o.shape for o in _outputs(model(x))] == shapes


def test_passthrough_repeats_each_channel_four_times_in_the_fused_conv():
    graph = DependencyGraph(TinyYOLO(), torch.rand(1, 3, 16, 16))
    group = graph.group_of("reduce.0.out")
    fuse_in = next(m for m in group.members if str(m) == "fuse.0.in")
    assert group.indices[fuse_in][1] == [1, 5, 9, 13]  # channel 1 of each of the 2x2 space-to-depth blocks
    deep = graph.group_of("deep.2.0.out")
    assert deep.indices[next(m for m in deep.members if str(m) == "fuse.0.in")][0] == [16]


class PixelShuffles(nn.Module):
    """torch's space-to-depth (the detectors' passthrough) and depth-to-space, as function and module."""

    def __init__(self, module: bool):
        super().__init__()
        self.a, self.b = _cbr(3, 6), _cbr(6 * 4, 8)
        self.c = nn.Conv2d(8, 12, 1)
        self.d = nn.Conv2d(3, 5, 1)
        self.unshuffle = nn.PixelUnshuffle(2) if module else (lambda x: F.pixel_unshuffle(x, 2))
        self.shuffle = nn.PixelShuffle(2) if module else (lambda x: F.pixel_shuffle(x, 2))

    def forward(self, x):
        y = self.shuffle(self.c(self.b(self.unshuffle(self.a(x)))))  # (B, 3, H, W): c's out in groups of 4
        return self.d(y)


@pytest.mark.parametrize("module", [True, False], ids=["module", "function"])
def test_pixel_unshuffle_repeats_and_pixel_shuffle_couples_channels(module):
    model = _randomize(PixelShuffles(module))
    x = _x(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    group = graph.group_of("a.0.out")
    b_in = next(m for m in group.members if str(m) == "b.0.in")
    assert group.indices[b_in][1] == [4, 5, 6, 7]  # input channel 1 -> its 4 spatial phases
    c_out = graph.group_of("c.out")
    assert [len(u) for u in c_out.indices[next(m for m in c_out.members if str(m) == "c.out")]] == [4, 4, 4]
    _, units = _prune_matches_masked(model, x, keep=0.6)
    assert model.b[0].in_channels == 4 * model.a[0].out_channels < 24
    assert model.c.out_channels % 4 == 0 and model.c.out_channels == 4 * model.d.in_channels


# ------------------------------------------------------------------ still refused, by name and reason
class PerChannelPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Conv2d(1, 4, 1), nn.PReLU(4)

    def forward(self, x):
        return self.act(self.a(x))


class SlicesChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return self.a(x).permute(0, 2, 3, 1)[..., 1:]


@pytest.mark.parametrize("model, message", [
    (PerChannelPReLU(), "node 'act'.*per-channel parameters"),
    (SlicesChannels(), "node 'getitem'.*on its channel dim"),
])
def test_unprunable_patterns_name_the_node_and_the_reason(model, message):
    with pytest.raises(ValueError, match=message):
        DependencyGraph(model, torch.rand(1, 1, 4, 4))


def test_mixing_reshapes_and_channel_reductions_lock_instead_of_failing():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 1), nn.Conv1d(16, 2, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            h = self.a(x)
            mixed = self.b(h.reshape(h.shape[0], 16, -1))  # channels and rows merged, read as channels
            g = self.c(h * h.softmax(1).amax(1, keepdim=True))
            return mixed, g

    graph = DependencyGraph(Mixer(), torch.rand(1, 1, 4, 4))
    assert graph.group_of("a.out").locked and "size 16 is hard-coded" in graph.group_of("a.out").reason
    assert {"b.in", "c.in"} <= {str(m) for m in graph.group_of("a.out").members}


def test_prune_api_on_a_zoo_block_with_the_default_schedule():
    model = TinyResNet().eval()
    x = torch.rand(2, 3, 8, 8)
    small = prune(model, x, get_criterion("l2"), OneShot(), Target(params=0.5, round_to=2))
    assert type(small) is TinyResNet and small(x).shape == (2, 5)


class MHABlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, nn.MultiheadAttention (batch first), residual."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.ln = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        y = self.ln(x)
        y, _ = self.attention(y, y, y, need_weights=False)
        return self.head((x + y)[:, 0])


def test_multihead_attention_module_prunes_the_same_dims_in_every_head(tmp_path):
    model = _randomize(MHABlock())
    x = _x(2, 4, 5)
    graph = DependencyGraph(model, x)
    group = graph.group_of("attention.embed")
    assert not group.locked and len(group) == 4 and group.indices[next(iter(group.indices))][1] == [1, 5]
    _prune_matches_masked(model, x, keep=0.7)
    mha = model.attention
    assert mha.embed_dim < 8 and mha.embed_dim == mha.head_dim * mha.num_heads == model.ln.normalized_shape[0]
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(MHABlock()), torch.load(tmp_path / "sd.pt", weights_only=True))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-9)


# ------------------------------------------------------------------ parameters used as operands (ViT)
class TinyViT(nn.Module):
    """A ViT: patchify conv, class token concatenated on the token dim, position embedding added,
    one pre-norm encoder block with nn.MultiheadAttention, the class token's features to the head."""

    def __init__(self, dim=8, heads=2, patch=2, image=4):
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim))
        self.ln_1, self.attention = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, images):
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        y = self.ln_1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln_2(x))))
        return self.head(self.ln(x)[:, 0])


def test_vit_trunk_shrinks_its_class_token_and_position_embedding(tmp_path):
    model = _randomize(TinyViT())
    x = _x(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    trunk = graph.group_of("conv_proj.out")
    assert not trunk.locked
    assert {"class_token.param", "pos_embedding.param", "attention.embed"} <= {str(m) for m in trunk.members}
    assert len(trunk) == 4  # one unit: the same position of both heads
    reference = masked_forward(graph, trunk.units[:1], x)
    graph.remove(trunk.units[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    _prune_matches_masked(model, x, keep=0.7)
    mha, width = model.attention, model.conv_proj.out_channels
    assert width < 8 and mha.embed_dim == width == mha.head_dim * mha.num_heads
    assert model.class_token.shape == (1, 1, width) and model.pos_embedding.shape == (1, 5, width)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(TinyViT()), torch.load(tmp_path / "sd.pt", weights_only=True))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-9)


class ViTEncoderBlock(nn.Module):
    """torchvision's EncoderBlock."""

    def __init__(self, heads, hidden_dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.1)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.1))

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer in miniature, written as there: the patch embedding is
    reshaped with the width as an int attribute (``reshape(n, self.hidden_dim, n_h * n_w)``,
    which fx traces as a literal), the class token expanded and concatenated, the position
    embedding added in the encoder."""

    def __init__(self, image_size=4, patch_size=2, hidden_dim=8, mlp_dim=16, heads=2, num_classes=3):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim, self.mlp_dim = image_size, patch_size, hidden_dim, mlp_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, hidden_dim))
        self.layers = nn.Sequential(ViTEncoderBlock(heads, hidden_dim, mlp_dim), ViTEncoderBlock(heads, hidden_dim,
                                                                                                 mlp_dim))
        self.ln = nn.LayerNorm(hidden_dim)
        self.heads = nn.Sequential(nn.Linear(hidden_dim, num_classes))

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.heads(x[:, 0])


def test_vit_width_written_as_an_attribute_follows_the_pruned_trunk(tmp_path):
    model = _randomize(TorchvisionViT())
    x = _x(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    trunk = graph.group_of("conv_proj.out")
    assert not trunk.locked and "hidden_dim.size" in {str(m) for m in trunk.members}
    assert len(trunk) == 4  # the same dim of both heads
    reference = masked_forward(graph, trunk.units[:1], x)
    graph.remove(trunk.units[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    _prune_matches_masked(model, x, keep=0.7)
    width = model.conv_proj.out_channels
    assert width < 8 and model.hidden_dim == width and model.mlp_dim == 16
    for block in model.layers:
        mha = block.self_attention
        assert mha.embed_dim == width == mha.head_dim * mha.num_heads and mha.num_heads == 2
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(TorchvisionViT()), torch.load(tmp_path / "sd.pt", weights_only=True),
                                      example_inputs=x)
    assert reloaded.hidden_dim == width
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-9)


class LiteralViT(TorchvisionViT):
    """The width written as a literal in the code, held by no attribute."""

    def __init__(self):
        super().__init__()
        del self.hidden_dim

    def _process_input(self, x):
        return self.conv_proj(x).reshape(x.shape[0], 8, 4).permute(0, 2, 1)


@pytest.mark.parametrize("model, reason", [
    (TorchvisionViT(hidden_dim=8, mlp_dim=8), "size 8 is hard-coded in node 'reshape' (attributes hidden_dim, mlp_dim "
                                              "of the model all hold it)"),
    (LiteralViT(), "(no int attribute of the model holds it)"),
])
def test_a_width_no_single_attribute_holds_locks_and_says_why(model, reason):
    graph = DependencyGraph(model, torch.rand(1, 3, 4, 4))
    trunk = graph.group_of("conv_proj.out")
    assert trunk.locked and reason in trunk.reason
    assert not graph.group_of("layers.0.mlp.0.out").locked  # the MLPs still prune


def test_a_parameter_read_twice_or_through_other_ops_still_locks():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.scale = nn.Conv2d(1, 4, 1), nn.Parameter(torch.ones(4, 1, 1))
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = self.a(x) * self.scale
            return self.b(h), self.scale.sum()  # the second read is not one the graph can shrink

    graph = DependencyGraph(Shared(), torch.rand(1, 1, 4, 4))
    assert graph.group_of("a.out").locked and "scale" in graph.group_of("a.out").reason


# ------------------------------------------------------------------ Swin's window attention
def window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
                     attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None, logit_scale=None,
                     training=True):
    """torchvision's shifted_window_attention without the shift and padding (windows tile the map)."""
    B, H, W, C = input.shape
    ws, num_windows = window_size, (H // window_size[0]) * (W // window_size[1])
    x = input.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(
        B * num_windows, ws[0] * ws[1], C)
    qkv = nn.functional.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1)) + relative_position_bias
    x = attn.softmax(-1).matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = nn.functional.linear(x, proj_weight, proj_bias)
    x = x.view(B, H // ws[0], W // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def patch_merging_pad(x):
    """torchvision's _patch_merging_pad for even maps: the 2x2 neighbours concatenated on the channels."""
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


torch.fx.wrap("window_attention")
torch.fx.wrap("patch_merging_pad")


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, [window, window]
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.position_bias = nn.Parameter(torch.randn(1, heads, window * window, window * window))

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.proj.weight, self.position_bias, self.window, self.heads,
                                shift_size=[0, 0], qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                training=self.training)


class TinySwin(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.patch, self.patch_norm = nn.Conv2d(3, dim, 2, 2), nn.LayerNorm(dim)
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, 2)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.merge_norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)
        self.head = nn.Linear(2 * dim, 3)

    def forward(self, images):
        x = self.patch_norm(self.patch(images).permute(0, 2, 3, 1))
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        x = self.reduction(self.merge_norm(patch_merging_pad(x)))
        return self.head(x.mean((1, 2)))


def test_swin_window_attention_prunes_the_same_dim_of_every_head(tmp_path):
    from pycompress.prune.rules import PatchMergingPadRule, ShiftedWindowAttentionRule

    register_rule(window_attention)(ShiftedWindowAttentionRule)  # the rules torchvision's functions have
    register_rule(patch_merging_pad)(PatchMergingPadRule)
    model = _randomize(TinySwin())
    x = _x(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    trunk = graph.group_of("patch.out")
    assert not trunk.locked and len(trunk) == 4
    assert {"attn.qkv.in", "attn.qkv.out", "attn.proj.in", "attn.proj.out", "merge_norm.norm"} <= \
        {str(m) for m in trunk.members}
    qkv_out = next(m for m in trunk.members if str(m) == "attn.qkv.out")
    assert trunk.indices[qkv_out][1] == [1, 5, 9, 13, 17, 21]  # dim 1 of both heads in q, k and v
    reference = masked_forward(graph, trunk.units[:1], x)
    graph.remove(trunk.units[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-9)
    assert (model.attn.qkv.in_features, model.attn.qkv.out_features, model.reduction.in_features) == (6, 18, 24)
    _prune_matches_masked(model, x, keep=0.8)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    reloaded = load_pruned_state_dict(_randomize(TinySwin()), torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
