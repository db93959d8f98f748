"""Property-based robustness of every public op and module: for random shapes (0-sized dims
included), dtypes and values (NaN, +-inf, huge), each call returns what a plain-PyTorch
reference returns, or raises ValueError / TypeError; never any other exception."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_kd_loss import reference_kd, reference_kd_topk
from test_nms import ref_batched_nms, ref_fm_nms, ref_nms

from pycompress import KDLoss, kd_loss
from pycompress.functional import apply_fm_nms, batched_nms, block_sparse_conv2d, fm_nms, fused_linear_kd_loss, nms
from pycompress.nn import BlockSparseConv2d, BlockSparseLinear, FusedLinearKDLoss

FAST = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SPECIALS = (float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0)
DTYPES = (torch.float32, torch.float64)


def _tensor(shape, dtype, seed, specials, scale=3.0):
    """Normal values with a fraction ``specials`` replaced by NaN, +-inf, huge or zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials and x.numel():
        where = torch.rand(shape, generator=g) < specials
        pick = torch.randint(len(SPECIALS), shape, generator=g)
        x = torch.where(where, torch.tensor(SPECIALS, dtype=torch.float64)[pick], x)
    return x.to(dtype)


def _agree(got, want, rtol=1e-4, atol=1e-5, skips_zeros=False):
    """Finite reference values must match; a non-finite reference must give a non-finite result,
    unless the op ``skips_zeros`` (a pruned block multiplies nothing, so an inf it would meet
    does not become the dense reference's 0 * inf = NaN)."""
    want = want.to(got.dtype)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol)
    if not skips_zeros:
        assert not torch.isfinite(got[~finite]).any()


def _call(fn, *args, **kwargs):
    """The result, or None when the call raised ValueError / TypeError (anything else fails)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None


kd_options = st.fixed_dictionaries({
    "divergence": st.sampled_from(("forward_kl", "reverse_kl", "jsd", "mse_logits")),
    "reduction": st.sampled_from(("none", "sum", "mean", "batchmean")),
    "temperature": st.sampled_from((0.5, 1.0, 4.0)),
    "alpha": st.sampled_from((1.0, 0.5)),
})


@FAST
@given(rows=st.lists(st.integers(0, 3), min_size=1, max_size=2), V=st.integers(0, 6), dtype=st.sampled_from(DTYPES),
       specials=st.sampled_from((0.0, 0.2)), seed=st.integers(0, 2 ** 16), options=kd_options,
       module=st.booleans(), topk=st.booleans())
def test_kd_loss_matches_reference_or_rejects(rows, V, dtype, specials, seed, options, module, topk):
    shape = (*rows, V)
    s = _tensor(shape, dtype, seed, specials).requires_grad_()
    t = _tensor(shape, dtype, seed + 1, specials)
    target = torch.randint(0, max(V, 1), tuple(rows), generator=torch.Generator().manual_seed(seed))
    teacher = t
    if topk and V:
        teacher = t.double().log_softmax(-1).to(dtype).topk(min(2, V))
    fn = KDLoss(**options) if module else (lambda *a: kd_loss(*a, **options))
    got = _call(fn, s, teacher, target)
    if got is None:
        assert V == 0 or (topk and specials)  # no classes; NaN top-k values are not log-probabilities
        return
    if topk and V:
        want = reference_kd_topk(s.detach(), teacher[0], teacher[1], target, **options)
    else:
        want = reference_kd(s.detach(), t, target, **options)
    _agree(got.detach(), want, rtol=1e-3 if dtype == torch.float32 else 1e-7)
    if got.numel() and bool(torch.isfinite(got).all()):
        got.sum().backward()
        assert s.grad.shape == s.shape


@FAST
@given(rows=st.integers(0, 4), H=st.integers(0, 3), V=st.integers(0, 5), dtype=st.sampled_from(DTYPES),
       specials=st.sampled_from((0.0, 0.2)), seed=st.integers(0, 2 ** 16), options=kd_options,
       module=st.booleans())
def test_fused_linear_kd_loss_matches_reference_or_rejects(rows, H, V, dtype, specials, seed, options, module):
    h = _tensor((rows, H), dtype, seed, specials, scale=1.0).requires_grad_()
    w = _tensor((V, H), dtype, seed + 1, specials, scale=1.0).requires_grad_()
    t = _tensor((rows, V), dtype, seed + 2, specials)
    target = torch.randint(0, max(V, 1), (rows,), generator=torch.Generator().manual_seed(seed))
    if module:
        got = _call(lambda: FusedLinearKDLoss(**options)(h, w, teacher_logits=t, target=target))
    else:
        got = _call(fused_linear_kd_loss, h, w, teacher_logits=t, target=target, **options)
    if got is None:
        assert V == 0
        return
    want = reference_kd(h.detach().double() @ w.detach().double().t(), t, target, **options)
    _agree(got.detach(), want, rtol=1e-3 if dtype == torch.float32 else 1e-7, atol=1e-4)


def _boxes(n, dtype, seed, specials):
    xy = _tensor((n, 2), torch.float64, seed, specials, scale=10.0)
    wh = _tensor((n, 2), torch.float64, seed + 1, specials, scale=5.0).abs()
    return torch.cat([xy, xy + wh], 1).to(dtype)


@FAST
@given(n=st.integers(0, 12), dtype=st.sampled_from(DTYPES + (torch.float16,)), specials=st.sampled_from((0.0, 0.2)),
       seed=st.integers(0, 2 ** 16), thr=st.sampled_from((0.0, 0.5, 1.0, float("nan"))), batched=st.booleans())
def test_nms_matches_reference_or_rejects(n, dtype, specials, seed, thr, batched):
    boxes = _boxes(n, dtype, seed, specials)
    scores = _tensor((n,), dtype, seed + 2, specials).sigmoid()
    if batched:
        idxs = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
        got, want = batched_nms(boxes, scores, idxs, thr), ref_batched_nms(boxes, scores, idxs, thr)
    else:
        got, want = nms(boxes, scores, thr), ref_nms(boxes, scores, thr)
    assert torch.equal(got, want)


@FAST
@given(shape=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 3), st.integers(0, 4), st.integers(0, 4)),
       dtype=st.sampled_from(DTYPES), specials=st.sampled_from((0.0, 0.2)), seed=st.integers(0, 2 ** 16),
       kernel_size=st.sampled_from((1, 3, 2)), suppress=st.booleans())
def test_fm_nms_matches_reference_or_rejects(shape, dtype, specials, seed, kernel_size, suppress):
    B, A, C, H, W = shape
    obj = _tensor((B, A, H, W), dtype, seed, specials).sigmoid()
    probs = _tensor((B, A, C, H, W), dtype, seed + 1, specials).softmax(2)
    keep = _call(fm_nms, obj, probs, kernel_size)
    if keep is None:
        assert kernel_size % 2 == 0
        return
    assert torch.equal(keep, ref_fm_nms(obj, probs, kernel_size))
    new_obj, new_probs = apply_fm_nms(obj, probs, kernel_size, suppress)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(new_probs, probs * keep.unsqueeze(2).to(dtype), **exact)
    torch.testing.assert_close(new_obj, obj * keep.to(dtype) if suppress else obj, **exact)


@FAST
@given(n=st.integers(0, 2), c=st.sampled_from((4, 8)), hw=st.integers(0, 5), k=st.sampled_from((1, 3)),
       padding=st.integers(0, 1), sparsity=st.sampled_from((0.0, 0.5, 1.0)), relu=st.booleans(),
       dtype=st.sampled_from((torch.float32, torch.float64, torch.bfloat16)), specials=st.sampled_from((0.0, 0.1)),
       seed=st.integers(0, 2 ** 16), functional=st.booleans())
def test_block_sparse_conv2d_matches_dense_or_rejects(n, c, hw, k, padding, sparsity, relu, dtype, specials, seed,
                                                      functional):
    torch.manual_seed(seed)
    dense = torch.nn.Conv2d(c, 8, k, padding=padding)
    m = BlockSparseConv2d.from_dense(dense, sparsity=sparsity, block_size=(4, 4), dense_threshold=1.0, relu=relu)
    x = _tensor((n, c, hw, hw), dtype, seed, specials, scale=1.0)
    if functional:
        got = _call(block_sparse_conv2d, x, m.values, m.col_idx, m.row_ptr, m.bias, k, 8, padding=padding, relu=relu)
    else:
        got = _call(m, x)
    try:
        want = m.to_dense().to(torch.float64)(x.double())
    except RuntimeError:  # torch rejects it too (input smaller than the kernel)
        assert got is None
        return
    assert got is not None and got.dtype == dtype
    want = want.relu() if relu else want
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    _agree(got.double(), want, rtol=tol, atol=tol, skips_zeros=True)


@FAST
@given(lead=st.lists(st.integers(0, 3), max_size=2), sparsity=st.sampled_from((0.0, 0.5, 0.9)),
       dtype=st.sampled_from((torch.float32, torch.float64)), specials=st.sampled_from((0.0, 0.1)),
       seed=st.integers(0, 2 ** 16))
def test_block_sparse_linear_matches_dense(lead, sparsity, dtype, specials, seed):
    torch.manual_seed(seed)
    m = BlockSparseLinear.from_dense(torch.nn.Linear(8, 6), sparsity=sparsity, block_size=(4, 4))
    x = _tensor((*lead, 8), dtype, seed, specials, scale=1.0)
    got = m(x)
    assert got.shape == (*lead, 6) and got.dtype == dtype
    _agree(got.double(), m.to_dense().double()(x.double()), rtol=1e-4, atol=1e-4, skips_zeros=True)


def test_block_sparse_rejects_bad_arguments_with_value_or_type_errors():
    m = BlockSparseConv2d.from_dense(torch.nn.Conv2d(4, 8, 3), block_size=(4, 4), sparsity=0.5)
    for bad in (torch.randn(1, 4, 5), torch.randn(1, 3, 5, 5), "x"):
        with pytest.raises((ValueError, TypeError)):
            m(bad)
    with pytest.raises((ValueError, TypeError)):
        block_sparse_conv2d(torch.randn(1, 4, 5, 5), m.values.double(), m.col_idx, m.row_ptr, None, 3, 8)
    with pytest.raises((ValueError, TypeError)):
        block_sparse_conv2d(torch.randn(1, 4, 5, 5), m.values, m.col_idx.int(), m.row_ptr, None, 3, 8)
    assert np.isfinite(float(m(torch.randn(1, 4, 5, 5)).sum()))
