"""Whole-network block-sparse inference: the fused residual epilogue (op, module, fx rewrite),
recycled outputs, and sparse networks against their float64 masked dense twins."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pycompress.functional import block_sparse_conv2d
from pycompress.models.nets import ResNetStyle
from pycompress.nn import BlockSparseConv2d
from pycompress.sparsity import FusedEpilogue, block_sparsify, fuse_epilogues
from pycompress.sparsity.convert import max_pool2d_strided
from tests.test_block_sparse import masked_dense_twin, ref_conv

pytestmark = pytest.mark.skipif(not torch.ops.pycompress.block_sparse_conv2d.default, reason="no _C")


def _randomize_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _sparse_resnet(sparsity, width=16):
    torch.manual_seed(0)
    model = _randomize_bn(ResNetStyle(width=width, in_channels=3))
    return block_sparsify(model, sparsity, fold_bn=True, inplace=False).model


# ---- the op's residual epilogue ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("k,stride,hw", [(3, 1, 13), (1, 1, 20), (3, 2, 14), (1, 1, 3)])
def test_residual_epilogue_matches_conv_plus_residual(k, stride, hw, relu, dtype):
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 24, k, stride, k // 2)
    m = BlockSparseConv2d.from_dense(conv, 0.6, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(2, 16, hw, hw)
    residual = torch.randn(2, 24, (hw + 2 * (k // 2) - k) // stride + 1, (hw + 2 * (k // 2) - k) // stride + 1)
    with torch.no_grad():
        want = ref_conv(x.double(), conv.double(), m.block_mask(), 8, 8) + residual.double()
        want = torch.relu(want) if relu else want
        got = block_sparse_conv2d(x.to(dtype), m.values, m.col_idx, m.row_ptr, m.bias, k, 24, stride, k // 2,
                                  relu=relu, residual=residual.to(dtype))
    assert got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got.double(), want, **tol)


def test_residual_gradients_match_dense():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(8, 8), dense_threshold=1.0, relu=True)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    residual = torch.randn(2, 16, 6, 6, requires_grad=True)
    dense = m.to_dense()
    (m(x, residual) ** 2).sum().backward()
    grads = (x.grad, residual.grad, m.values.grad, m.bias.grad)
    x2, r2 = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    (torch.relu(dense(x2) + r2) ** 2).sum().backward()
    mask = m.block_mask().repeat_interleave(8, 0).repeat_interleave(8, 1).reshape(16, 8, 3, 3)
    torch.testing.assert_close(grads[0], x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], r2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[3], dense.bias.grad, atol=1e-4, rtol=1e-4)
    dense_values = BlockSparseConv2d.from_dense(dense, block_mask=m.block_mask(), block_size=(8, 8)).values
    assert dense_values.shape == grads[2].shape
    w_grad = (dense.weight.grad * mask).reshape(16, -1)
    # the kept blocks' gradient, in the values' (nnzb, bk, bo) layout
    from pycompress.ops.block_sparse import block_rows, dense_to_blocks
    torch.testing.assert_close(grads[2], dense_to_blocks(w_grad, 8, 8, block_rows(m.row_ptr), m.col_idx),
                               atol=1e-4, rtol=1e-4)


def test_residual_op_passes_opcheck():
    torch.manual_seed(4)
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0)
    args = (torch.randn(1, 8, 5, 5, requires_grad=True), m.values.detach().requires_grad_(), m.col_idx, m.row_ptr,
            m.bias.detach(), [3, 3], [1, 1], [1, 1], [1, 1], 8, True, torch.randn(1, 8, 5, 5, requires_grad=True))
    torch.library.opcheck(torch.ops.pycompress.block_sparse_conv2d.default, args)


def test_residual_bad_inputs_name_the_argument():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(1, 8, 5, 5)
    op = torch.ops.pycompress.block_sparse_conv2d
    args = (x, m.values.detach(), m.col_idx, m.row_ptr, None, [3, 3], [1, 1], [1, 1], [1, 1], 8, False)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        op(*args, torch.randn(1, 8, 5, 4))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        op(*args, torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, None, 3, 8, padding=1, residual=[1.0])
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        m(x, 1.0)


def test_module_adds_a_broadcast_residual_unfused():
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(8, 8), dense_threshold=1.0, relu=True)
    x, bias = torch.randn(2, 8, 5, 5), torch.randn(8, 1, 1)
    with torch.no_grad():
        want = torch.relu(ref_conv(x, conv, m.block_mask(), 8, 8) + bias)
        torch.testing.assert_close(m(x, bias), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x, bias.double().expand(2, 8, 5, 5)), want.double(), atol=1e-5, rtol=1e-5)


def test_recycled_outputs_do_not_alias_live_tensors():
    # 8 x 64 x 56 x 56 fp32 outputs come from the recycled huge-page blocks.
    torch.manual_seed(6)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, 0.95, block_size=(8, 8))
    x1, x2 = torch.randn(8, 64, 56, 56), torch.randn(8, 64, 56, 56)
    with torch.no_grad():
        y1 = m(x1)
        y2 = m(x2)
        del y2
        y3 = m(x2, y1)  # y1 is read while a recycled block is written
        ref1 = ref_conv(x1, conv, m.block_mask(), 8, 8)
        torch.testing.assert_close(y1, ref1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y3, ref_conv(x2, conv, m.block_mask(), 8, 8) + ref1, atol=1e-4, rtol=1e-4)


# ---- the op's fused LeakyReLU and max-pool ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stride,hw,pool,slope", [
    (3, 1, 13, 2, 0.1),   # odd size: floor mode drops the last row and column
    (3, 1, 40, 2, 0.0),   # wide rows: several strips per pooled row
    (1, 1, 20, 2, 0.1),   # a 1x1 conv, which runs through the padded copy when pooled
    (3, 2, 17, 2, 0.1),   # strided
    (3, 1, 11, 3, 0.25),  # a 3 x 3 window (the scalar pooling loop)
])
def test_pooled_activation_matches_pool_of_leaky_relu(k, stride, hw, pool, slope, dtype):
    torch.manual_seed(12)
    conv = nn.Conv2d(16, 24, k, stride, k // 2)
    m = BlockSparseConv2d.from_dense(conv, 0.6, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(2, 16, hw, hw)
    with torch.no_grad():
        conv_out = ref_conv(x.double(), conv.double(), m.block_mask(), 8, 8)
        want = F.max_pool2d(F.leaky_relu(conv_out, slope), pool)
        got = block_sparse_conv2d(x.to(dtype), m.values, m.col_idx, m.row_ptr, m.bias, k, 24, stride, k // 2,
                                  relu=True, negative_slope=slope, pool=pool)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(got.double(), want, **tol)


def test_leaky_relu_without_pool_and_pool_without_activation():
    torch.manual_seed(13)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(8, 8), dense_threshold=1.0)
    x, residual = torch.randn(2, 8, 9, 9), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        conv_out = ref_conv(x.double(), conv.double(), m.block_mask(), 8, 8)
        got = block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, m.bias, 3, 16, padding=1, relu=True,
                                  residual=residual, negative_slope=0.2)
        torch.testing.assert_close(got.double(), F.leaky_relu(conv_out + residual.double(), 0.2), atol=1e-5, rtol=1e-5)
        got = block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, m.bias, 3, 16, padding=1, pool=2)
        torch.testing.assert_close(got.double(), F.max_pool2d(conv_out, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slope,pool", [(0.1, 2), (0.0, 2), (0.1, 1)])
def test_pooled_activation_gradients_match_dense(slope, pool):
    torch.manual_seed(14)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, 0.5, block_size=(8, 8), dense_threshold=1.0, relu=True,
                                     negative_slope=slope, pool=pool)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    dense = m.to_dense()
    weights = torch.randn(2, 16, 7 // pool, 7 // pool)
    (m(x) * weights).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (F.max_pool2d(F.leaky_relu(dense(x2), slope), pool) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bias.grad, dense.bias.grad, atol=1e-4, rtol=1e-4)
    from pycompress.ops.block_sparse import block_rows, dense_to_blocks
    mask = m.block_mask().repeat_interleave(8, 0).repeat_interleave(8, 1).reshape(16, 8, 3, 3)
    torch.testing.assert_close(m.values.grad, dense_to_blocks((dense.weight.grad * mask).reshape(16, -1), 8, 8,
                                                              block_rows(m.row_ptr), m.col_idx), atol=1e-4, rtol=1e-4)


def test_pooled_op_passes_opcheck():
    torch.manual_seed(15)
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0)
    args = (torch.randn(1, 8, 6, 5, requires_grad=True), m.values.detach().requires_grad_(), m.col_idx, m.row_ptr,
            m.bias.detach().requires_grad_(), [3, 3], [1, 1], [1, 1], [1, 1], 8, True, None, 0.1, 2)
    torch.library.opcheck(torch.ops.pycompress.block_sparse_conv2d.default, args)


def test_activation_and_pool_bad_inputs_name_the_argument():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(1, 8, 5, 5)
    op = torch.ops.pycompress.block_sparse_conv2d
    args = (x, m.values.detach(), m.col_idx, m.row_ptr, None, [3, 3], [1, 1], [1, 1], [1, 1], 8)
    for kernel_args, message in [((True, None, -0.1), "negative_slope must be finite and >= 0"),
                                 ((True, None, float("nan")), "negative_slope must be finite"),
                                 ((False, None, 0.1), "needs relu=True"),
                                 ((True, None, 0.0, 0), "pool must be >= 1"),
                                 ((True, torch.randn(1, 8, 5, 5), 0.0, 2), "residual cannot be combined with pool"),
                                 ((True, None, 0.0, 6), "smaller than pool=6")]:
        with pytest.raises(ValueError, match=message):
            op(*args, *kernel_args)
    with pytest.raises(TypeError, match="pool must be an int"):
        block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, None, 3, 8, padding=1, pool=2.0)
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, None, 3, 8, padding=1, relu=True, negative_slope="0.1")
    for kwargs in (dict(pool=0), dict(pool=True), dict(negative_slope=-1.0)):
        with pytest.raises(ValueError, match="pool must be a positive int|negative_slope must be a finite"):
            BlockSparseConv2d(8, 8, 3, relu=True, **kwargs)


# ---- the fx rewrite ----

def test_fuse_epilogues_fuses_every_resnet_block():
    sparse = _sparse_resnet(0.75)
    report = fuse_epilogues(sparse, inplace=False)
    epilogues = [f for f in report if not f.out_padding]  # layouts: test_fuse_epilogues_keeps_padded_layouts_...
    assert [(f.conv, f.add is not None) for f in epilogues] == (
        [(f"stages.{i}.conv2", True) for i in range(6)] + [(f"stages.{i}.conv1", False) for i in range(6)])
    assert all(isinstance(f, FusedEpilogue) and f.relu is not None for f in epilogues)
    code = report.model.code
    assert "add" not in code and "relu" not in code
    assert all(report.model.get_submodule(f.conv).relu for f in epilogues)
    assert not any(m.relu for n, m in sparse.named_modules() if n.endswith("conv2"))  # the copy was rewritten
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), sparse(x), atol=1e-5, rtol=1e-5)
    assert report.model.state_dict().keys() == sparse.state_dict().keys()


@pytest.mark.parametrize("sparsity", [0.75, 0.9, 0.95])
def test_sparse_resnet_matches_the_float64_masked_dense_model(sparsity):
    sparse = _sparse_resnet(sparsity)
    reference = masked_dense_twin(sparse).double()
    fused = fuse_epilogues(sparse, inplace=False).model
    for batch in (1, 3):
        x = torch.randn(batch, 3, 24, 24)
        with torch.no_grad():
            want = reference(x.double())
            got = fused(x)
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


class _Variants(nn.Module):
    """One residual add per ReLU spelling, plus adds that must stay unfused."""

    def __init__(self):
        super().__init__()
        make = lambda relu=False: BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, (8, 8),
                                                                dense_threshold=1.0, relu=relu)
        self.a, self.b, self.c, self.d, self.e, self.f, self.g, self.h = (make() for _ in range(8))
        self.own_relu = make(relu=True)
        self.act = nn.ReLU()
        self.ident = nn.Identity()

    def forward(self, x):
        x = F.relu(self.a(x) + x)
        x = self.act(torch.add(x, self.ident(self.b(x))))  # conv second, through an Identity
        x = (self.c(x) + x).relu()
        x = self.d(x).add(x)  # no ReLU
        x = self.own_relu(x) + x  # ReLU before the add: not fusable
        y = self.e(x)
        x = y + y  # the conv's output is used twice
        x = torch.relu(self.f(x) + x[:, :1])  # broadcast residual: fused, added by torch at run time
        x = torch.relu(self.g(x) + x) * 2
        return F.relu(self.ident(self.h(x)), inplace=True)  # a lone ReLU


def test_fuse_epilogues_spellings_and_refusals():
    torch.manual_seed(7)
    model = _Variants().eval()
    report = fuse_epilogues(model, inplace=False)
    assert [(f.conv, f.add is not None, f.relu is not None) for f in report if not f.out_padding] == [
        ("a", True, True), ("b", True, True), ("c", True, True), ("d", True, False), ("f", True, True),
        ("g", True, True), ("h", False, True)]
    # padded layouts where only 3x3 convs read the output (d's also feeds an add, e's and g's torch ops)
    assert [(f.conv, f.out_padding) for f in report if f.out_padding] == [("a", 1), ("b", 1), ("c", 1), ("f", 1)]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), model(x), atol=1e-5, rtol=1e-5)


def test_fuse_epilogues_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_epilogues("model", inplace=False)
    with pytest.raises(ValueError, match="eval"):
        fuse_epilogues(ResNetStyle(), inplace=False)

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="traceable"):
        fuse_epilogues(Untraceable().eval(), inplace=False)


class _PoolVariants(nn.Module):
    """conv-BN-LeakyReLU-pool stages, and the pools that must stay (a second reader, padding, ceil mode)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
                               nn.MaxPool2d(2))
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.pool_b = nn.MaxPool2d(2, 2)
        self.c = nn.Conv2d(16, 16, 1)
        self.pool_c = nn.MaxPool2d(2)  # the conv's output is read twice: not fused
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.pool_d = nn.MaxPool2d(2, padding=1)
        self.e = nn.Conv2d(16, 16, 3, padding=1)
        self.pool_e = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        x = self.pool_b(F.leaky_relu(self.b(self.a(x)), 0.2))
        c = torch.relu(self.c(x))
        x = self.pool_c(c) + F.avg_pool2d(c, 2)
        return self.pool_e(self.e(self.pool_d(self.d(x))))


def test_fuse_epilogues_fuses_leaky_relus_and_max_pools():
    torch.manual_seed(16)
    model = _randomize_bn(_PoolVariants())
    sparse = block_sparsify(model, 0.5, fold_bn=True, inplace=False).model
    report = fuse_epilogues(sparse, inplace=False)
    assert [(f.conv, f.relu is not None, f.pool, f.out_padding) for f in report] == [
        ("a.0", True, None, 0), ("b", True, None, 0), ("c", True, None, 0), ("a.0", False, "a_3", 0),
        ("b", False, "pool_b", 0), ("a.0", False, None, 1)]  # a's pooled map is b's padded input
    fused = report.model
    a = fused.get_submodule("a.0")
    assert (a.negative_slope, a.pool, fused.b.negative_slope, fused.b.pool) == (0.1, 2, 0.2, 2)
    assert (fused.c.pool, fused.d.pool, fused.e.pool) == (1, 1, 1)
    # pool_c has a second reader: not fused, but rewritten to strided maxima; the others stay
    modules = {n.target for n in fused.graph.nodes if n.op == "call_module"}
    strided = [n for n in fused.graph.nodes if n.target is max_pool2d_strided]
    assert "pool_c" not in modules and len(strided) == 1 and {"pool_d", "pool_e"} <= modules
    assert "negative_slope=0.2, pool=2" in repr(fused.b)
    x = torch.randn(2, 8, 20, 20)
    with torch.no_grad():
        want = masked_dense_twin(sparse).double()(x.double())
        torch.testing.assert_close(fused(x).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p,shape", [(2, (2, 3, 9, 8)), (2, (1, 1, 2, 5)), (3, (2, 2, 10, 7))])
def test_max_pool2d_strided_equals_max_pool2d(p, shape):
    torch.manual_seed(18)
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[3] = float("nan")
    torch.testing.assert_close(max_pool2d_strided(x, p), F.max_pool2d(x, p), atol=0, rtol=0, equal_nan=True)


def test_fuse_epilogues_leaves_a_keyword_input_relu_after_an_add():
    class KeywordRelu(nn.Module):  # fx records torch.relu(input=...) with no positional argument
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(input=self.c(x) + x)

    torch.manual_seed(19)
    sparse = block_sparsify(KeywordRelu().eval(), 0.5, inplace=False).model
    report = fuse_epilogues(sparse, inplace=False)
    assert [(f.conv, f.add is not None, f.relu) for f in report] == [("c", True, None)]
    assert not report.model.c.relu and report.model.c.negative_slope == 0.0
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), sparse(x), atol=1e-5, rtol=1e-5)


def test_sparse_yolo_matches_the_float64_masked_dense_model():
    from pycompress.models.detection import build_detector

    torch.manual_seed(17)
    model = _randomize_bn(build_detector("yolo_teacher", width=8, image_size=64))
    sparse = block_sparsify(model, 0.75, fold_bn=True, inplace=False).model
    report = fuse_epilogues(sparse, inplace=False)
    assert sum(f.pool is not None for f in report) == 2  # the third pool's input also feeds the passthrough
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = masked_dense_twin(sparse).double()(x.double())
        got = report.model(x).double()
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


# ---- the padded output layout (out_padding) ----

def _padded_base(out, q):
    """The zero-bordered planes behind an out_padding = q output, (N, C, OH + 2q, OW + 2q)."""
    n, c, h, w = out.shape
    return out.as_strided((n, c, h + 2 * q, w + 2 * q), out.stride(), out.storage_offset() - q * out.stride(2) - q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stride,hw,pool,q,residual", [
    (3, 1, 13, 1, 1, False), (3, 1, 13, 1, 2, True), (1, 1, 20, 1, 1, True), (3, 2, 14, 1, 1, False),
    (3, 1, 13, 2, 1, False), (1, 1, 3, 1, 1, False), (3, 1, 1, 1, 1, False)])  # the last: one-row planes
def test_out_padding_is_a_zero_bordered_layout_of_the_same_values(k, stride, hw, pool, q, residual, dtype):
    torch.manual_seed(30)
    conv = nn.Conv2d(16, 24, k, stride, k // 2)
    m = BlockSparseConv2d.from_dense(conv, 0.6, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(2, 16, hw, hw, dtype=dtype)
    oh = (hw + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(2, 24, oh, oh, dtype=dtype) if residual else None
    args = (x, m.values, m.col_idx, m.row_ptr, m.bias, k, 24, stride, k // 2, 1, True, r, 0.1, pool)
    with torch.no_grad():
        plain = block_sparse_conv2d(*args)
        padded = block_sparse_conv2d(*args, out_padding=q)
    h, w = plain.shape[-2:]
    hb, wb = h + 2 * q, w + 2 * q
    assert padded.dtype == dtype and padded.shape == plain.shape
    assert padded.stride() == (24 * hb * wb, hb * wb, wb, 1) and padded.storage_offset() == q * wb + q
    assert padded.untyped_storage().nbytes() >= (2 * 24 * hb * wb + 2 * wb + 128) * padded.element_size()
    assert torch.equal(padded, plain)  # same sums in the same order: only the layout differs
    base = _padded_base(padded, q)
    border = torch.ones_like(base, dtype=torch.bool)
    border[..., q:q + h, q:q + w] = False
    assert not base[border].any()


def test_a_conv_reads_a_padded_layout_in_place_with_the_same_result():
    torch.manual_seed(31)
    first = BlockSparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), 0.5, block_size=(8, 8),
                                         dense_threshold=1.0, relu=True)
    second = BlockSparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), 0.5, block_size=(8, 8),
                                          dense_threshold=1.0, relu=True)
    pooled = BlockSparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), 0.5, block_size=(8, 8),
                                          dense_threshold=1.0, relu=True, pool=2)
    x = torch.randn(3, 16, 11, 9)
    with torch.no_grad():
        y = first(x)
        first.out_padding = 1
        y_padded = first(x)
        assert not y_padded.is_contiguous() and torch.equal(y_padded, y)
        for reader in (second, pooled):
            want = reader(y)
            assert torch.equal(reader(y_padded), want)  # read in place
            assert torch.equal(reader(y_padded, None), want)
        # the same layout as a residual, read strided by the store
        assert torch.equal(second(y, y_padded), second(y, y))
        # a border that is not zero (someone wrote through the base) is noticed, not read as padding
        base = _padded_base(y_padded, 1)
        base[1, 3, 0, 4] = 7.0
        assert torch.equal(second(y_padded), second(y))
        base[1, 3, 0, 4] = 0.0
        base[2, 15, 5, -1] = float("nan")
        assert torch.equal(second(y_padded), second(y))
        # a view whose strides look padded but whose storage ends early is copied instead
        short = torch.zeros(3 * 16 * 13 * 11)
        view = short.as_strided(y.shape, (16 * 13 * 11, 13 * 11, 11, 1), 12)
        view.copy_(y)
        assert torch.equal(second(view), second(y))


def test_out_padding_gradients_and_opcheck():
    torch.manual_seed(32)
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0,
                                     relu=True)
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    (m(x) ** 2).sum().backward()
    plain = (x.grad, m.values.grad, m.bias.grad)
    x.grad = m.values.grad = m.bias.grad = None
    m.out_padding = 2
    (m(x) ** 2).sum().backward()
    for got, want in zip((x.grad, m.values.grad, m.bias.grad), plain):
        torch.testing.assert_close(got, want)
    args = (torch.randn(1, 8, 6, 5, requires_grad=True), m.values.detach().requires_grad_(), m.col_idx, m.row_ptr,
            m.bias.detach().requires_grad_(), [3, 3], [1, 1], [1, 1], [1, 1], 8, True, None, 0.0, 1, 1)
    torch.library.opcheck(torch.ops.pycompress.block_sparse_conv2d.default, args)


def test_out_padding_bad_inputs_name_the_argument():
    m = BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1), 0.5, block_size=(8, 8), dense_threshold=1.0)
    x = torch.randn(1, 8, 5, 5)
    op = torch.ops.pycompress.block_sparse_conv2d
    with pytest.raises(ValueError, match="out_padding must be >= 0"):
        op(x, m.values.detach(), m.col_idx, m.row_ptr, None, [3, 3], [1, 1], [1, 1], [1, 1], 8, False, None, 0.0,
           1, -1)
    with pytest.raises(TypeError, match="out_padding must be an int"):
        block_sparse_conv2d(x, m.values, m.col_idx, m.row_ptr, None, 3, 8, padding=1, out_padding=1.0)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="out_padding must be an int >= 0"):
            BlockSparseConv2d(8, 8, 3, out_padding=bad)


def test_fuse_epilogues_keeps_padded_layouts_between_resnet_convs():
    sparse = _sparse_resnet(0.9)
    report = fuse_epilogues(sparse, inplace=False)
    padded = {f.conv: f.out_padding for f in report if f.out_padding}
    fused = report.model
    # A conv whose output feeds only stride-1 3x3 convs and residuals writes the padded layout: conv1
    # of each block (read by conv2), and the stem or a block when the next block keeps the resolution
    # (read by its conv1 and taken as its residual). Outputs read by a strided conv (stages 2 and 4
    # halve the resolution), a residual alone (the projection shortcuts) or the head stay plain.
    assert padded == {"stem.0": 1, **{f"stages.{i}.conv1": 1 for i in range(6)},
                      **{f"stages.{i}.conv2": 1 for i in (0, 2, 4)}}
    assert all(fused.get_submodule(n).out_padding == 1 for n in padded)
    x = torch.randn(2, 3, 24, 24)
    plain = fuse_epilogues(sparse, inplace=False).model
    for m in plain.modules():
        if isinstance(m, BlockSparseConv2d):
            m.out_padding = 0
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
