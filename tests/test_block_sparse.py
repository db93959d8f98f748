"""Tests of the block-sparse conv op, its modules and block_sparsify.

Reference: F.conv2d / F.linear with the dense weight multiplied by the expanded
block mask, built here independently of pycompress's own BSR helpers.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycompress
from pycompress._extension import cpu_bf16_dot
from pycompress.models.nets import ResNetStyle
from pycompress.nn import BlockSparseConv2d, BlockSparseLinear
from pycompress.config import DataConfig
from pycompress.sparsity import block_sparsify, fold_batchnorm

OP = torch.ops.pycompress.block_sparse_conv2d
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def masked_weight(weight: torch.Tensor, block_mask: torch.Tensor, bo: int, bk: int) -> torch.Tensor:
    """The dense weight with pruned (bo x bk) blocks of its (out, k) GEMM view set to zero."""
    out = weight.shape[0]
    full = block_mask.repeat_interleave(bo, 0).repeat_interleave(bk, 1)[:out]
    return (weight.reshape(out, -1) * full).reshape(weight.shape)


def ref_conv(x, conv: nn.Conv2d, block_mask, bo, bk, relu=False):
    w = masked_weight(conv.weight, block_mask, bo, bk)
    y = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return torch.relu(y) if relu else y


# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, block_size): covers the
# source layouts (1x1 direct, stride-1 padded, strided phase planes), odd sizes,
# Cout not a multiple of bo, and every micro-kernel row count (8, 4, 2, 1).
# 1x1 direct mode ends each image's last strip at its last pixel (the strip
# overlaps the one before it): 7x9 and 10x11 have ragged tails, 6x8 exactly one
# 8 x 3 strip, and 6x6 is smaller than a strip (padded copy instead).
# (Copies without column padding move each plane as one run.)
CONV_CASES = [
    (1, 16, 24, 7, 9, 3, 1, 1, 1, (8, 8)),
    (8, 16, 16, 5, 5, 3, 1, 1, 1, (8, 8)),
    (2, 12, 20, 9, 7, 3, 2, 1, 1, (4, 4)),
    (3, 8, 13, 11, 10, 3, 1, 2, 2, (8, 3)),
    (8, 32, 16, 6, 6, 1, 1, 0, 1, (16, 8)),
    (1, 9, 10, 13, 5, 1, 2, 0, 1, (2, 1)),
    (2, 5, 7, 8, 11, (3, 1), (1, 2), (1, 0), (2, 1), (1, 5)),
    (1, 24, 40, 17, 17, 5, 1, 2, 1, (8, 4)),
    (2, 8, 12, 13, 12, 3, 3, 2, 2, (4, 8)),
    (8, 16, 8, 9, 9, 1, 2, 0, 1, (8, 8)),
    (3, 16, 16, 7, 9, 1, 1, 0, 1, (8, 8)),
    (2, 8, 12, 10, 11, 1, 1, 0, 1, (4, 8)),
    (2, 16, 8, 6, 8, 1, 1, 0, 1, (8, 4)),
    (2, 6, 8, 9, 10, (3, 1), 1, (1, 0), 1, (4, 3)),  # rows padded, columns not: whole-plane copy
]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def _make_conv(case, seed=0):
    n, cin, cout, h, w, k, s, p, d, bs = case
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d)
    x = torch.randn(n, cin, h, w)
    return conv, x, bs


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}s{c[6]}p{c[7]}d{c[8]}")
def test_conv_matches_masked_dense(case, sparsity):
    conv, x, (bo, bk) = _make_conv(case)
    m = BlockSparseConv2d.from_dense(conv, sparsity, block_size=(bo, bk), dense_threshold=1.0)
    assert m.dense_reason() is None
    mask = m.block_mask()
    assert m.density == pytest.approx(mask.double().mean().item())
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = m(x1)
    y_ref = ref_conv(x2, conv, mask, bo, bk)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
    if sparsity == 1.0:  # no block left: the bias alone
        assert m.values.shape[0] == 0
        torch.testing.assert_close(y, conv.bias.detach().view(1, -1, 1, 1).expand_as(y))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bias_relu_and_weight_grads(bias, relu):
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 12, 3, 1, 1, bias=bias)
    x = torch.randn(2, 16, 6, 5)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(4, 4), relu=relu)
    mask = m.block_mask()
    y = m(x)
    y_ref = ref_conv(x, conv, mask, 4, 4, relu)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    y.square().sum().backward()
    dense = m.to_dense()
    yd = dense(x)
    (torch.relu(yd) if relu else yd).square().sum().backward()
    # Kept blocks get the dense weight's gradient; pruned blocks have no parameter.
    full = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[:12].reshape(dense.weight.shape)
    torch.testing.assert_close(_values_grad_to_dense(m), dense.weight.grad * full, **TOL[torch.float32])
    if bias:
        torch.testing.assert_close(m.bias.grad, dense.bias.grad, **TOL[torch.float32])


def _values_grad_to_dense(m):
    from pycompress.ops.block_sparse import bsr_to_dense

    out, k = m._gemm_shape
    return bsr_to_dense(m.values.grad, m.col_idx, m.row_ptr, out, k).reshape(m.to_dense().weight.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[4], CONV_CASES[10]],
                         ids=["3x3", "strided", "1x1-small", "1x1"])
def test_conv_half_precision_input_accumulates_in_fp32(case, dtype):
    """bf16/fp16 in and out, fp32 sums: the result is the conv of the widened input,
    rounded once (so within one rounding of the output dtype). On the bf16
    dot-product path (1x1, at least one pixel strip, AVX512-BF16 builds) the
    weights are rounded to bf16 as well."""
    conv, x, (bo, bk) = _make_conv(case)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(bo, bk), dense_threshold=1.0, relu=True)
    xh = x.to(dtype).requires_grad_(True)
    y = m(xh)
    assert y.dtype == dtype
    bf16_weights = dtype == torch.bfloat16 and case is CONV_CASES[10] and cpu_bf16_dot()
    ref_conv_w = copy.deepcopy(conv)
    if bf16_weights:
        ref_conv_w.weight.data = ref_conv_w.weight.data.bfloat16().float()
    ref = ref_conv(xh.detach().float(), ref_conv_w, m.block_mask(), bo, bk, relu=True)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, atol=1e-5, rtol=eps)
    # Backward runs in fp32 with the fp32 weights, through the forward's ReLU pattern:
    # on the dot-product path that is within bf16 rounding of the rounded-weight gradient.
    y.float().sum().backward()
    x32 = xh.detach().float().requires_grad_(True)
    ref_conv(x32, ref_conv_w, m.block_mask(), bo, bk, relu=True).sum().backward()
    assert xh.grad.dtype == dtype
    atol = eps * x32.grad.abs().max().item() if bf16_weights else 1e-5  # sums of weights off by 2^-9
    torch.testing.assert_close(xh.grad.float(), x32.grad, atol=atol, rtol=eps)


@pytest.mark.skipif(not cpu_bf16_dot(), reason="built without AVX512-BF16")
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(2, 32, 24, 7, 7, (8, 8)), (1, 16, 32, 9, 11, (16, 2)), (3, 64, 8, 8, 6, (8, 4))])
def test_bf16_pointwise_dot_product_path(shape, sparsity):
    """bf16 1x1: pairs of bf16 products summed in fp32 (vdpbf16ps), the weights rounded
    to bf16 once: equal to the fp32 conv with bf16-rounded weights, up to the output's
    rounding and the order of the fp32 sums."""
    n, cin, cout, h, w, bs = shape
    torch.manual_seed(11)
    conv = nn.Conv2d(cin, cout, 1)
    m = BlockSparseConv2d.from_dense(conv, sparsity, block_size=bs, dense_threshold=1.0, relu=True)
    x = torch.randn(n, cin, h, w).bfloat16()
    rounded = copy.deepcopy(conv)
    rounded.weight.data = rounded.weight.data.bfloat16().float()
    ref = ref_conv(x.float(), rounded, m.block_mask(), *bs, relu=True)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=1e-5, rtol=2 ** -8)


def test_explicit_block_mask_is_kept_exactly():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    mask = torch.rand(2, 9) < 0.3  # (16 / 8 block rows, 72 / 8 block columns)
    m = BlockSparseConv2d.from_dense(conv, block_size=(8, 8), block_mask=mask)
    assert torch.equal(m.block_mask(), mask)


def test_pruning_drops_the_lowest_norm_blocks():
    conv = nn.Conv2d(1, 4, 1, bias=False)  # GEMM view (4, 1); bo=1 -> 4 blocks
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -1.0, 4.0, 0.5]).view(4, 1, 1, 1))
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(1, 1), dense_threshold=1.0)
    assert m.block_mask().flatten().tolist() == [True, False, True, False]


def test_to_dense_round_trip_is_exact():
    conv, x, bs = _make_conv(CONV_CASES[3])
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=bs)
    dense = m.to_dense()
    assert torch.equal(dense.weight, masked_weight(conv.weight.detach(), m.block_mask(), *bs))
    assert torch.equal(dense.bias, conv.bias)
    assert (dense.stride, dense.padding, dense.dilation, dense.groups) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups)
    again = BlockSparseConv2d.from_dense(dense, block_size=bs, block_mask=m.block_mask())
    assert torch.equal(again.values, m.values) and torch.equal(again.col_idx, m.col_idx)
    assert torch.equal(again.row_ptr, m.row_ptr)


def test_state_dict_round_trip():
    conv, x, bs = _make_conv(CONV_CASES[2])
    m = BlockSparseConv2d.from_dense(conv, 0.9, block_size=bs)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert {"values", "col_idx", "row_ptr", "bias"} <= set(sd)
    fresh = BlockSparseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, block_size=bs)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), m(x))
    assert fresh.density == m.density


def test_dense_fallback_is_reported_and_correct():
    conv, x, bs = _make_conv(CONV_CASES[0])
    m = BlockSparseConv2d.from_dense(conv, 0.25, block_size=bs, dense_threshold=0.5)
    assert f"kernel=dense fallback (density {m.density:.3f} > dense_threshold 0.5)" in repr(m)
    torch.testing.assert_close(m(x), ref_conv(x, conv, m.block_mask(), *bs), **TOL[torch.float32])
    sparse = BlockSparseConv2d.from_dense(conv, 0.75, block_size=bs, dense_threshold=0.5)
    assert "kernel=block-sparse" in repr(sparse)


def test_grouped_conv_falls_back_to_dense():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 5, 5)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(1, 1))
    assert "groups=8" in repr(m)
    torch.testing.assert_close(m(x), ref_conv(x, conv, m.block_mask(), 1, 1), **TOL[torch.float32])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_linear_matches_masked_dense(sparsity):
    torch.manual_seed(4)
    lin = nn.Linear(48, 37)
    x = torch.randn(3, 5, 48, requires_grad=True)
    m = BlockSparseLinear.from_dense(lin, sparsity, block_size=(8, 4), dense_threshold=1.0)
    w = masked_weight(lin.weight, m.block_mask(), 8, 4)
    y = m(x)
    y_ref = F.linear(x, w, lin.bias)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, **TOL[torch.float32])
    assert torch.equal(m.to_dense().weight, w.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 12, 3, 1, 1)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(4, 8))
    x = torch.randn(2, 8, 5, 6, dtype=dtype, requires_grad=True)
    args = (x, m.values.detach().requires_grad_(True), m.col_idx, m.row_ptr, m.bias.detach().requires_grad_(True),
            [3, 3], [1, 1], [1, 1], [1, 1], 12, True)
    torch.library.opcheck(OP.default, args)


# ---- input checks: one test each ----

def test_non_4d_input_is_rejected():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3), 0.5)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        OP(torch.randn(8, 5, 5), m.values, m.col_idx, m.row_ptr, None, [3, 3], [1, 1], [0, 0], [1, 1], 8, False)


def test_wrong_input_channels_is_rejected():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3), 0.5)
    with pytest.raises(ValueError, match="expects 8 input channels, got 4"):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="must divide in_channels"):  # the op: bk=8 vs 3*3*3
        OP(torch.randn(1, 3, 5, 5), m.values, m.col_idx, m.row_ptr, None, [3, 3], [1, 1], [0, 0], [1, 1], 8, False)


def test_block_width_must_divide_the_gemm_columns():
    with pytest.raises(ValueError, match="bk=4 must divide the GEMM view's 27 columns"):
        BlockSparseConv2d.from_dense(nn.Conv2d(3, 8, 3), 0.5, block_size=(8, 4))


def test_bad_block_size_type_is_rejected():
    with pytest.raises(TypeError, match="pair of ints"):
        BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3), 0.5, block_size=8)


def test_block_mask_shape_is_checked():
    with pytest.raises(ValueError, match=r"shape \(1, 9\)"):
        BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3), block_size=(8, 8), block_mask=torch.ones(2, 9, dtype=bool))


def test_sparsity_range_is_checked():
    with pytest.raises(ValueError, match="sparsity"):
        BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3), 1.5)


def test_op_rejects_inconsistent_bsr():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 16, 3), 0.5, block_size=(8, 8))
    x = torch.randn(1, 8, 5, 5)
    conv = ([3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="out_channels=32 does not match 2 block rows"):
        OP(x, m.values, m.col_idx, m.row_ptr, None, *conv, 32, False)
    bad_cols = m.col_idx.clone()
    bad_cols[0] = 9
    with pytest.raises(ValueError, match=r"col_idx\[0\] = 9 is outside"):
        OP(x, m.values, bad_cols, m.row_ptr, None, *conv, 16, False)
    with pytest.raises(ValueError, match="row_ptr must start at 0 and end at nnzb"):
        OP(x, m.values, m.col_idx, m.row_ptr + 1, None, *conv, 16, False)
    with pytest.raises(TypeError, match="input must be float32"):
        OP(x.double(), m.values, m.col_idx, m.row_ptr, None, *conv, 16, False)


def test_linear_wrong_features_is_rejected():
    m = BlockSparseLinear.from_dense(nn.Linear(16, 8), 0.5)
    with pytest.raises(ValueError, match=r"\(\*, 16\)"):
        m(torch.randn(4, 15))


# ---- whole models ----

def masked_dense_twin(model: nn.Module) -> nn.Module:
    """The same function with dense layers: a copy with each block-sparse layer replaced
    by its masked dense weight (+ its fused activation and pool). Also the benchmarks' dense baseline."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, (BlockSparseConv2d, BlockSparseLinear)):
            dense = mod.to_dense()
            if getattr(mod, "relu", False):
                slope = getattr(mod, "negative_slope", 0.0)
                dense = nn.Sequential(dense, nn.LeakyReLU(slope) if slope else nn.ReLU())
            if getattr(mod, "pool", 1) > 1:
                dense = nn.Sequential(dense, nn.MaxPool2d(mod.pool))
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, dense)
    return twin


def test_block_sparsify_resnet_matches_its_masked_dense_self():
    torch.manual_seed(6)
    model = ResNetStyle(width=16, in_channels=3).eval()
    x = torch.randn(2, 3, 16, 16)
    report = block_sparsify(model, 0.75, exclude="fc", example_input=x, inplace=True)
    names = [r.name for r in report.layers]
    assert "fc" not in names and "stages.0.conv1" in names
    assert isinstance(model.stages[0].conv1, BlockSparseConv2d)
    assert all(abs(r.density - 0.25) < 0.05 for r in report.layers if r.kernel == "block-sparse")
    assert 0.6 < report.flops_saved / report.dense_flops < 0.8
    assert "total:" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_dense_twin(model)(x), **TOL[torch.float32])


def test_block_sparsified_model_compiles_and_exports():
    """Deployment paths: torch.compile(fullgraph=True) traces the op through its fake
    kernel, and torch.export keeps it as one pycompress::block_sparse_conv2d node."""
    torch.manual_seed(9)
    model = _trained_bn(ResNetStyle(width=8, in_channels=3))
    block_sparsify(model, 0.75, fold_bn=True, inplace=True)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), ref)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    sparse_layers = sum(isinstance(m, (BlockSparseConv2d, BlockSparseLinear)) for m in model.modules())
    assert targets.count("pycompress.block_sparse_conv2d.default") == sparse_layers == 16  # 15 convs + fc
    torch.testing.assert_close(exported.module()(x), ref)


def test_block_sparsify_include_and_skips():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Flatten(),
                          nn.Linear(16, 4))
    report = block_sparsify(model, 0.25, block_size=(8, 4), include=["0", "1", "2"], inplace=True)
    kinds = {r.name: r.kernel for r in report.layers}
    assert kinds["0"].startswith("skipped") and "bk=4" in kinds["0"]
    assert kinds["1"] == "skipped (groups=8)"
    assert kinds["2"] == "dense fallback (density 0.750 > dense_threshold 0.5)"
    assert "4" not in kinds and isinstance(model[4], nn.Linear)


def _trained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm non-trivial running statistics and affine parameters, then eval()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def test_fold_batchnorm_keeps_the_function_and_finds_the_single_use_relu():
    torch.manual_seed(7)
    model = _trained_bn(ResNetStyle(width=8, in_channels=3))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    folded = fold_batchnorm(model, inplace=True)
    by_conv = {f.conv: f for f in folded}
    # Every conv of the net is followed by its own BN; only the stem's ReLU is a module.
    assert set(by_conv) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert by_conv["stem.0"].relu == "stem.2" and by_conv["stages.0.conv1"].relu is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_leaves_shared_and_branching_modules_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn_a, self.bn_b, self.shared = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            a = self.a(x)  # used by its BN and by the sum: not foldable
            y = self.relu(self.bn_a(a)) + a
            y = self.relu(self.bn_b(self.b(y)))  # foldable, but the ReLU module is shared
            return self.shared(self.c(y)) + self.shared(y)  # a BN called twice: not foldable

    model = _trained_bn(Net())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    folded = fold_batchnorm(model, inplace=True)
    assert [(f.conv, f.bn, f.relu) for f in folded] == [("b", "bn_b", None)]
    assert isinstance(model.bn_a, nn.BatchNorm2d) and isinstance(model.shared, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_rejects_training_mode_and_untraceable_models():
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), inplace=True)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="traceable"):
        fold_batchnorm(Branchy().eval(), inplace=True)
    with pytest.raises(ValueError, match="eval"):
        block_sparsify(ResNetStyle(width=8, in_channels=3), 0.5, fold_bn=True, inplace=True)


def test_block_sparsify_with_folded_bn_matches_the_folded_masked_dense_model():
    torch.manual_seed(8)
    model = _trained_bn(ResNetStyle(width=16, in_channels=3))
    x = torch.randn(2, 3, 16, 16)
    report = block_sparsify(model, 0.75, exclude="fc", fold_bn=True, example_input=x, inplace=True)
    fused = {r.name: r.fused for r in report.layers}
    assert fused["stem.0"] == "bn+relu" and fused["stages.0.conv1"] == "bn"
    assert "bn+relu" in str(report)
    assert isinstance(model.stem[2], nn.Identity) and isinstance(model.stages[0].bn1, nn.Identity)
    assert model.stem[0].relu and not model.stages[0].conv1.relu
    # The blocks were ranked on the folded weights, and the sparse kernel computes
    # exactly the masked folded convs (bias and ReLU fused into its store).
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_dense_twin(model)(x), **TOL[torch.float32])


# ---- Triton kernel, under TRITON_INTERPRET=1 without a GPU ----

@pytest.mark.triton
@pytest.mark.parametrize("case", [
    (2, 6, 5, 7, 6, 3, 1, 1, 1, (4, 2), 0.5, True, 0.0, 1, 0),
    (1, 8, 16, 5, 5, 3, 2, 0, 1, (8, 8), 0.0, False, 0.0, 1, 0),
    (2, 4, 7, 6, 7, 3, 1, 2, 2, (2, 3), 1.0, True, 0.0, 1, 0),
    (2, 6, 5, 7, 9, 3, 1, 1, 1, (4, 2), 0.5, True, 0.1, 2, 1),
])
def test_triton_kernel_matches_masked_dense(case, device):
    from pycompress.kernels.block_sparse import block_sparse_conv2d_triton

    n, cin, cout, h, w, k, s, p, d, (bo, bk), sparsity, relu, slope, pool, q = case
    torch.manual_seed(7)
    conv = nn.Conv2d(cin, cout, k, s, p, d).to(device)
    x = torch.randn(n, cin, h, w, device=device)
    m = BlockSparseConv2d.from_dense(conv, sparsity, block_size=(bo, bk), dense_threshold=1.0)
    y = block_sparse_conv2d_triton(x, m.values.detach(), m.col_idx, m.row_ptr, m.bias.detach(), [k, k], [s, s],
                                   [p, p], [d, d], cout, relu, None, slope, pool, q, block_p=16,
                                   input_precision="ieee")
    want = ref_conv(x, conv, m.block_mask(), bo, bk).detach()
    want = F.max_pool2d(F.leaky_relu(want, slope) if relu else want, pool)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    # out_padding: the CPU op's layout (strides and offset; the values are the same)
    hb, wb = y.shape[2] + 2 * q, y.shape[3] + 2 * q
    assert y.stride() == ((cout * hb * wb, hb * wb, wb, 1) if q else y.contiguous().stride())
    assert y.storage_offset() == q * wb + q


# ---- BatchNorm folding into block-sparse layers, and the block-sparsify CLI ----

def test_fold_batchnorm_into_block_sparse_layers_scales_the_kept_blocks():
    torch.manual_seed(10)
    model = _trained_bn(ResNetStyle(width=16))
    block_sparsify(model, 0.6, inplace=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        masks = {n: m.block_mask().clone() for n, m in model.named_modules() if isinstance(m, BlockSparseConv2d)}
        folded = fold_batchnorm(model, inplace=True)
        assert len(folded) == 15 and {f.relu for f in folded} == {None, "stem.2"}
        assert model.stem[0].relu and isinstance(model.stem[2], nn.Identity)
        for n, m in model.named_modules():
            if isinstance(m, BlockSparseConv2d):
                assert torch.equal(m.block_mask(), masks[n])  # pruned blocks stay pruned
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        assert fold_batchnorm(model, inplace=True) == []  # nothing left to fold


@pytest.mark.parametrize("affine,bias", [(False, False), (True, True)])
def test_fold_batchnorm_into_block_sparse_without_affine_or_bias(affine, bias):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=bias), nn.BatchNorm2d(12, affine=affine), nn.ReLU())
    model = _trained_bn(model) if affine else model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    block_sparsify(model, 0.5, inplace=True)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert [(f.conv, f.bn, f.relu) for f in fold_batchnorm(model, inplace=True)] == [("0", "1", "2")]
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_block_sparsify_cli_reports_accuracy_latency_and_flops(tmp_path):
    from pycompress.cli import main

    out = tmp_path / "report.json"
    assert main(["block-sparsify", "--model", "resnet", "--model-kwargs", '{"width": 8}', "--sparsity", "0.5,0.9",
                 "--exclude", "fc", "--dense-epochs", "1", "--finetune-epochs", "1", "--fold-bn",
                 "--batch-sizes", "1,4", "--repeats", "2", "--output", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "0.5 sparse", "0.9 sparse"]
    assert rows["0.9 sparse"]["density"] < rows["0.5 sparse"]["density"] < 1.0
    assert 0.8 < rows["0.9 sparse"]["flops_saved"] < 0.95
    # one epoch on digits beats the 10 % of chance by far; the sparse rows report their own latency
    assert all(r["accuracy"] > 0.3 for r in rows.values()), rows
    assert rows["0.9 sparse"]["speedup_batch4"] == rows["dense"]["batch4_ms"] / rows["0.9 sparse"]["batch4_ms"]
    assert all(layer["name"] != "fc" for layer in rows["0.5 sparse"]["layers"])


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "0.5,1.5"], "must be in \\[0, 1\\]"),
    (["--data", "none"], "needs --input-shape"),
    (["--data", "none", "--input-shape", "1,8,8", "--finetune-epochs", "1"], "training needs --data"),
    (["--block-size", "8"], "bo,bk"),
])
def test_block_sparsify_cli_rejects_bad_options(argv, message, capsys):
    import re

    from pycompress.cli.block_sparsify import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pycompress block-sparsify: error: ") and re.search(message, err), err


def test_block_sparsify_experiment_python_api_matches_its_config():
    from pycompress.config import BlockSparsifyConfig
    from pycompress.sparsity import block_sparsify_experiment

    model = ResNetStyle(width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BlockSparsifyConfig(data=DataConfig(dataset="none"), input_shape=[1, 8, 8], sparsities=[0.75],
                              batch_sizes=[2], repeats=1, exclude=["fc"])
    report = block_sparsify_experiment(model, config=cfg)
    assert [r["model"] for r in report["rows"]] == ["dense", "0.75 sparse"]
    assert 0.7 < report["rows"][1]["flops_saved"] < 0.8 and report["rows"][1]["accuracy"] is None
    # the dense model is left as it was: the sparse one is a converted copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_converters_copy_unless_inplace():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    report = block_sparsify(model, 0.5, inplace=False)
    assert isinstance(model[0], nn.Conv2d) and isinstance(report.model[0], BlockSparseConv2d)
    folded = fold_batchnorm(model, inplace=False)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(folded.model[1], nn.Identity)
    with pytest.warns(DeprecationWarning, match="inplace=True"):
        block_sparsify(model, 0.5)
    assert isinstance(model[0], BlockSparseConv2d)


def test_old_import_path_warns():
    import importlib
    import sys

    sys.modules.pop("pycompress.prune.block_sparse", None)
    with pytest.warns(DeprecationWarning, match="pycompress.sparsity"):
        old = importlib.import_module("pycompress.prune.block_sparse")
    assert old.block_sparsify is block_sparsify


def test_block_sparsify_cli_rejects_unparsable_numbers(capsys):
    from pycompress.cli.block_sparsify import main

    with pytest.raises(SystemExit):
        main(["--sparsity", "0.5,lots"])
    assert "comma-separated floats" in capsys.readouterr().err
