"""pycompress.functional.nms / batched_nms / fm_nms / apply_fm_nms against plain-Python references.

The NMS reference is torchvision's greedy loop written out in numpy, one kept
box against all later boxes, in the compute dtype (float32 for fp32/fp16/bf16,
float64 for fp64), with std::max / std::min semantics and the float-vs-double
threshold comparison torchvision makes. The FM-NMS reference is the greedy rule
of shared/METHODS.md section 3, candidate by candidate.
"""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pycompress
from pycompress.functional import apply_fm_nms, batched_nms, fm_nms, nms

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# ---------------------------------------------------------------------------
# References


def _compute_np(boxes):
    """Boxes as a numpy array in the compute dtype (fp16/bf16 widen exactly to fp32)."""
    wide = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    return boxes.to(wide).numpy()


def ref_iou(b, i, js):
    """IoU of box(es) i (the kept role) with boxes js, torchvision's float ops in b's dtype."""
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    zero = np.zeros((), b.dtype)
    with np.errstate(all="ignore"):  # inf and NaN are part of the contract
        return _iou(x1, y1, x2, y2, zero, i, js)


def _iou(x1, y1, x2, y2, zero, i, js):
    area = (x2 - x1) * (y2 - y1)
    xx1 = np.where(x1[i] < x1[js], x1[js], x1[i])  # std::max(ix1, x1[j])
    yy1 = np.where(y1[i] < y1[js], y1[js], y1[i])
    xx2 = np.where(x2[js] < x2[i], x2[js], x2[i])  # std::min(ix2, x2[j])
    yy2 = np.where(y2[js] < y2[i], y2[js], y2[i])
    dw, dh = xx2 - xx1, yy2 - yy1
    w = np.where(zero < dw, dw, zero)
    h = np.where(zero < dh, dh, zero)
    inter = w * h
    return inter / (area[i] + area[js] - inter)


def ref_nms(boxes, scores, thr):
    b = _compute_np(boxes)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        later = np.asarray(order[pos + 1:], dtype=np.int64)
        if later.size:
            # torchvision compares the float IoU with the double threshold.
            suppressed[later[ref_iou(b, i, later).astype(np.float64) > thr]] = True
    return torch.tensor(keep, dtype=torch.int64)


def ref_batched_nms(boxes, scores, idxs, thr):
    kept = torch.zeros(len(scores), dtype=torch.bool)
    for c in torch.unique(idxs).tolist():
        members = torch.where(idxs == c)[0]
        kept[members[ref_nms(boxes[members], scores[members], thr)]] = True
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[kept[order]]


def fm_nms_visit_order(objectness_flat):
    """Descending objectness, ties by lower index, NaN after everything (the lowest score)."""
    values = objectness_flat.tolist()
    return sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not
                                                     math.isnan(values[i]) else 0.0, i))


def ref_fm_nms(objectness, class_probs, kernel_size):
    """The greedy FM-NMS rule, one candidate at a time."""
    B, A, H, W = objectness.shape
    r = kernel_size // 2
    cls = class_probs.argmax(dim=2)
    keep = torch.zeros(B, A, H, W, dtype=torch.bool)
    for b in range(B):
        suppressed = torch.zeros(A, H, W, dtype=torch.bool)
        for flat in fm_nms_visit_order(objectness[b].reshape(-1)):
            a, h, w = flat // (H * W), (flat // W) % H, flat % W
            if suppressed[a, h, w]:
                continue
            keep[b, a, h, w] = True
            c = cls[b, a, h, w]
            for a2 in range(A):
                for h2 in range(max(0, h - r), min(H, h + r + 1)):
                    for w2 in range(max(0, w - r), min(W, w + r + 1)):
                        if cls[b, a2, h2, w2] == c:
                            suppressed[a2, h2, w2] = True
    return keep


def fm_nms_torch(objectness, class_probs, kernel_size):
    """The same greedy rule with PyTorch ops (the benchmark baseline): rounds that keep every
    undecided candidate ranked first among the undecided same-class candidates of its window,
    then suppress the undecided candidates next to a newly kept one."""
    B, A, H, W = objectness.shape
    C = class_probs.shape[2]
    r = kernel_size // 2
    N = A * H * W
    order = torch.tensor([fm_nms_visit_order(row) for row in objectness.reshape(B, N)], dtype=torch.long
                         ).reshape(B, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N).expand(B, N).contiguous())
    score = (N - rank).to(torch.float32).reshape(B, 1, A, H, W)  # higher is better, exact in fp32
    cls = class_probs.argmax(dim=2)
    undecided = cls.unsqueeze(1) == torch.arange(C).reshape(1, C, 1, 1, 1)  # (B, C, A, H, W)
    kept = torch.zeros_like(undecided)
    pool = dict(kernel_size=(A, kernel_size, kernel_size), stride=1, padding=(0, r, r))
    while bool(undecided.any()):
        v = torch.where(undecided, score, 0.0).reshape(B * C, 1, A, H, W)
        best = torch.nn.functional.max_pool3d(v, **pool).reshape(B, C, 1, H, W)
        new = undecided & (score == best)
        near = torch.nn.functional.max_pool3d(new.to(torch.float32).reshape(B * C, 1, A, H, W), **pool)
        kept |= new
        undecided &= ~new & ~(near.reshape(B, C, 1, H, W) > 0)
    return kept.any(dim=1)


# ---------------------------------------------------------------------------
# Inputs


def random_boxes(n, dtype=torch.float32, seed=0, extent=100.0, max_size=30.0, integer=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * extent - extent / 4
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * max_size
    boxes = torch.cat([xy, xy + wh], dim=1)
    if integer:
        boxes = boxes.round()
    return boxes.to(dtype)


def random_scores(n, dtype=torch.float32, seed=0, levels=None):
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    if levels:  # few distinct values: many exact ties
        s = (s * levels).floor() / levels
    return s.to(dtype)


def assert_same(got, want):
    assert got.dtype == torch.int64
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------------------
# nms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 129, 1000])
@pytest.mark.parametrize("thr", [0.5, 0.7, 0.0])
def test_nms_matches_reference(device, dtype, n, thr):
    boxes = random_boxes(n, dtype, seed=n, integer=True)
    scores = random_scores(n, dtype, seed=n, levels=50)
    assert_same(nms(boxes.to(device), scores.to(device), thr).cpu(), ref_nms(boxes, scores, thr))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_half_is_nms_of_float(dtype):
    boxes = random_boxes(300, dtype, seed=3)
    scores = random_scores(300, dtype, seed=3)
    assert_same(nms(boxes, scores, 0.4), nms(boxes.float(), scores.float(), 0.4))


_coord = st.integers(-6, 12).map(float) | st.sampled_from([0.5, 1e-7, -1e6, 1e30])
_box = st.tuples(_coord, _coord, _coord, _coord)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    boxes=st.lists(_box, min_size=0, max_size=40),
    score_levels=st.integers(1, 6),
    thr=st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 0.7, 1.0, -0.25, 1e-9]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_nms_randomised(boxes, score_levels, thr, dtype, seed):
    """Small integer grids give exact ties, IoUs exactly at the threshold, zero-area,
    inverted and nested boxes; a few huge and tiny coordinates mix in."""
    b = torch.tensor(boxes, dtype=dtype).reshape(-1, 4)
    s = random_scores(len(boxes), dtype, seed=seed, levels=score_levels)
    assert_same(nms(b, s, thr), ref_nms(b, s, thr))


def mixed_boxes(n, dtype, seed):
    """Detector-like boxes on a coarse grid (exact IoU ties) with a tenth replaced by
    zero-area, inverted, NaN, infinite, tiny and huge boxes."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, torch.float64, seed=seed, extent=64.0, max_size=16.0, integer=True)
    specials = torch.tensor([[3.0, 3, 3, 9], [9, 9, 2, 2], [float("nan"), 0, 5, 5], [0, 0, float("inf"), 5],
                             [-float("inf"), -float("inf"), float("inf"), float("inf")], [1, 1, 1 + 1e-6, 1 + 1e-6],
                             [-1e30, -1e30, 1e30, 1e30], [5, 5, 6, 6], [2, 2, 40, 40]], dtype=torch.float64)
    pick = torch.randint(0, n, (n // 10,), generator=g)
    boxes[pick] = specials[torch.randint(0, len(specials), (len(pick),), generator=g)]
    return boxes.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [300, 3000])
@pytest.mark.parametrize("thr", [0.0, 1e-12, 1e-9, 0.3, 0.5, 0.9, -0.5, float("nan"), float("inf")])
def test_nms_mixed_special_boxes(device, dtype, n, thr):
    boxes = mixed_boxes(n, dtype, seed=n)
    scores = random_scores(n, dtype, seed=n, levels=30)
    assert_same(nms(boxes.to(device), scores.to(device), thr).cpu(), ref_nms(boxes, scores, thr))


def test_nms_iou_exactly_at_threshold_is_kept():
    boxes = torch.tensor([[0.0, 0, 2, 1], [1, 0, 3, 1]])  # inter 1, union 3
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes.double(), scores.double(), 1 / 3).tolist() == [0, 1]  # 1/3 is not > 1/3
    assert nms(boxes, scores, 1 / 3).tolist() == [0]  # float32(1/3) rounds up, above the double 1/3
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 2]])  # IoU exactly 0.5
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999).tolist() == [0]


def test_nms_float_iou_compared_with_double_threshold():
    # float32(1/10) > 0.1 as doubles: torchvision suppresses in float32, not in float64.
    boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 10, 1]])  # inter 1, union 10
    scores = torch.tensor([1.0, 0.5])
    assert nms(boxes, scores, 0.1).tolist() == [0]
    assert nms(boxes.double(), scores.double(), 0.1).tolist() == [0, 1]


def test_nms_adversarial_inputs():
    n = 257
    same = torch.tensor([[1.0, 2.0, 5.0, 7.0]]).repeat(n, 1)
    scores = random_scores(n, seed=1)
    assert nms(same, scores, 0.5).tolist() == [int(scores.argmax())]
    equal = torch.full((n,), 0.25)
    assert nms(same, equal, 0.5).tolist() == [0]  # ties: the lowest index wins
    boxes = random_boxes(n, seed=2)
    assert_same(nms(boxes, equal, 0.5), ref_nms(boxes, equal, 0.5))
    nested = torch.tensor([[-float(k), -float(k), float(k), float(k)] for k in range(1, 40)])
    ns = torch.linspace(0, 1, 39)
    for thr in (0.0, 0.5, 0.9):
        assert_same(nms(nested, ns, thr), ref_nms(nested, ns, thr))
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]]).repeat(5, 1)  # zero area: 0/0 suppresses nothing
    assert nms(point, torch.arange(5.0), 0.5).tolist() == [4, 3, 2, 1, 0]
    assert nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_nms_nan_and_inf():
    boxes = torch.tensor([[0.0, 0, 4, 4], [float("nan"), 0, 4, 4], [0, 0, float("inf"), 4], [1, 1, 5, 5],
                          [0, 0, 4, float("nan")], [-float("inf"), 0, 4, 4], [0, 0, 4, 4]])
    scores = torch.tensor([0.5, 0.9, float("nan"), 0.5, 0.7, 0.6, 0.1])
    for thr in (0.0, 0.3, -1.0):
        assert_same(nms(boxes, scores, thr), ref_nms(boxes, scores, thr))


def test_nms_100k_boxes_subsample():
    """100k boxes: every kept box is not suppressed by an earlier kept box and every dropped
    box is, which characterises greedy NMS; checked on a random subsample of boxes."""
    n, thr = 100_000, 0.5
    boxes = random_boxes(n, seed=7, extent=2000.0, max_size=60.0)
    scores = random_scores(n, seed=7, levels=1000)
    keep = nms(boxes, scores, thr)
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    assert bool((rank[keep].diff() > 0).all())  # score order
    b = _compute_np(boxes)
    kept_np, rank_np = keep.numpy(), rank.numpy()
    for j in torch.randperm(n, generator=torch.Generator().manual_seed(0))[:400].tolist():
        earlier = kept_np[rank_np[kept_np] < rank_np[j]]
        # IoU(i, j) of every earlier kept box i with j, i in the kept-box role.
        hit = bool((ref_iou(b, earlier, np.array([j])).astype(np.float64) > thr).any())
        assert bool(kept[j]) == (not hit), j


def test_batched_nms_100k_boxes_one_class_exact():
    n = 100_000
    boxes, scores = random_boxes(n, seed=8, extent=1000.0, max_size=60.0), random_scores(n, seed=8)
    idxs = torch.randint(0, 20, (n,), generator=torch.Generator().manual_seed(8))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert bool((scores[keep].diff() <= 0).all())
    sub = torch.where(idxs == 11)[0]  # one class (~5k boxes) against the reference
    assert_same(keep[idxs[keep] == 11], sub[ref_nms(boxes[sub], scores[sub], 0.5)])


def test_nms_non_contiguous_inputs():
    boxes = random_boxes(300, seed=12).t().contiguous().t()  # column-major view
    scores = random_scores(600, seed=12)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert_same(nms(boxes, scores, 0.5), ref_nms(boxes.contiguous(), scores.contiguous(), 0.5))


# ---------------------------------------------------------------------------
# batched_nms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 97, 2000])
def test_batched_nms_matches_reference(device, dtype, n):
    boxes = random_boxes(n, dtype, seed=n + 11, integer=True)
    scores = random_scores(n, dtype, seed=n, levels=40)
    idxs = torch.randint(-3, 17, (n,), generator=torch.Generator().manual_seed(n))
    got = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5).cpu()
    assert_same(got, ref_batched_nms(boxes, scores, idxs, 0.5))


@settings(max_examples=80, deadline=None)
@given(
    boxes=st.lists(_box, min_size=0, max_size=40),
    n_classes=st.integers(1, 4),
    thr=st.sampled_from([0.0, 0.5, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_batched_nms_randomised(boxes, n_classes, thr, seed):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    s = random_scores(len(boxes), seed=seed, levels=4)
    idxs = torch.randint(0, n_classes, (len(boxes),), generator=torch.Generator().manual_seed(seed))
    assert_same(batched_nms(b, s, idxs, thr), ref_batched_nms(b, s, idxs, thr))


def test_batched_nms_huge_coordinates_and_class_values():
    # A coordinate offset per class (idx * (max + 1)) would lose these boxes' precision.
    boxes = random_boxes(500, torch.float64, seed=5) + 1e15
    scores = random_scores(500, torch.float64, seed=5)
    idxs = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(5)) * 2**40 - 7
    assert_same(batched_nms(boxes, scores, idxs, 0.3), ref_batched_nms(boxes, scores, idxs, 0.3))


def test_batched_nms_same_with_one_or_two_threads():
    boxes, scores = random_boxes(20_000, seed=9, extent=1000.0), random_scores(20_000, seed=9)
    idxs = torch.randint(0, 20, (20_000,), generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batched_nms(boxes, scores, idxs, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert_same(batched_nms(boxes, scores, idxs, 0.5), one)
    sub = torch.where(idxs == 3)[0]  # one class checked against the reference
    want = set(sub[ref_nms(boxes[sub], scores[sub], 0.5)].tolist())
    assert {i for i in one.tolist() if idxs[i] == 3} == want


# ---------------------------------------------------------------------------
# fm_nms


def random_map(B, A, C, H, W, dtype=torch.float32, seed=0, levels=None):
    g = torch.Generator().manual_seed(seed)
    obj = torch.rand(B, A, H, W, generator=g)
    if levels:
        obj = (obj * levels).floor() / levels
    probs = torch.softmax(torch.randn(B, A, C, H, W, generator=g) * 2, dim=2)
    return obj.to(dtype), probs.to(dtype)


FM_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 4, 5, 6), (3, 5, 7, 13, 11), (1, 2, 20, 1, 9)]


@pytest.mark.parametrize("shape", FM_SHAPES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fm_nms_matches_reference(device, shape, kernel_size, dtype):
    obj, probs = random_map(*shape, dtype=dtype, seed=sum(shape), levels=8)  # ties in objectness
    got = fm_nms(obj.to(device), probs.to(device), kernel_size).cpu()
    assert got.dtype == torch.bool and got.shape == obj.shape
    assert torch.equal(got, ref_fm_nms(obj, probs, kernel_size))


@pytest.mark.parametrize("shape", FM_SHAPES)
def test_fm_nms_torch_baseline_matches_reference(shape):
    obj, probs = random_map(*shape, seed=1 + sum(shape), levels=5)
    assert torch.equal(fm_nms_torch(obj, probs, 3), ref_fm_nms(obj, probs, 3))


def test_fm_nms_chain_and_equal_objectness():
    # A diagonal chain of one class: greedy keeps every other cell, a max-pool rule would not.
    obj = torch.zeros(1, 1, 6, 6)
    for k in range(6):
        obj[0, 0, k, k] = 1.0 - 0.1 * k
    probs = torch.zeros(1, 1, 2, 6, 6)
    probs[:, :, 0] = 1.0
    assert torch.equal(fm_nms(obj, probs, 3), ref_fm_nms(obj, probs, 3))
    flat = torch.full((2, 3, 4, 4), 0.5)  # all equal: lower flat index first
    p = torch.rand(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fm_nms(flat, p, 3), ref_fm_nms(flat, p, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fm_nms_nan_probabilities_follow_torch_argmax(dtype):
    obj, probs = random_map(2, 3, 5, 7, 19, dtype=dtype, seed=9, levels=4)  # 19: a vector plus a tail
    g = torch.Generator().manual_seed(9)
    probs[torch.rand(probs.shape, generator=g) < 0.05] = float("nan")
    assert torch.equal(fm_nms(obj, probs, 3), ref_fm_nms(obj, probs, 3))


def test_fm_nms_every_candidate_is_kept_or_next_to_a_kept_one():
    obj, probs = random_map(4, 5, 20, 13, 13, seed=3)
    keep = fm_nms(obj, probs, 3)
    kept_cls = torch.where(keep, probs.argmax(2), -1)
    assert 0 < int(keep.sum()) < keep.numel()
    # A kept candidate has no kept same-class neighbour in its window.
    assert torch.equal(fm_nms_torch(obj, probs, 3), keep)
    assert torch.equal(fm_nms(obj, probs, 3), keep)  # deterministic
    assert (kept_cls >= 0).sum() == keep.sum()


def test_fm_nms_empty_and_non_contiguous():
    obj, probs = random_map(3, 2, 4, 5, 6, seed=6)
    assert fm_nms(obj[:0], probs[:0]).shape == (0, 2, 5, 6)
    obj_nc = obj.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(fm_nms(obj_nc, probs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)),
                       ref_fm_nms(obj, probs, 3))


@pytest.mark.parametrize("suppress_objectness", [False, True])
def test_apply_fm_nms(suppress_objectness):
    obj, probs = random_map(2, 3, 4, 5, 6, seed=4)
    keep = ref_fm_nms(obj, probs, 3)
    obj_out, probs_out = apply_fm_nms(obj, probs, 3, suppress_objectness)
    assert torch.equal(probs_out, probs * keep.unsqueeze(2))
    assert torch.equal(obj_out, obj * keep if suppress_objectness else obj)
    assert torch.equal(probs_out[~keep.unsqueeze(2).expand_as(probs)], torch.zeros(int((~keep).sum()) * 4))


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 2, 3, 7, 3)])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_fm_nms_triton_matches_reference(shape, kernel_size):
    from pycompress.kernels.nms import fm_nms_triton

    obj, probs = random_map(*shape, seed=sum(shape) + kernel_size, levels=6)
    if torch.cuda.is_available():
        obj, probs = obj.cuda(), probs.cuda()
    got = fm_nms_triton(obj, probs, kernel_size).cpu()
    assert torch.equal(got, ref_fm_nms(obj.cpu(), probs.cpu(), kernel_size))


# ---------------------------------------------------------------------------
# Input checks (one per check)


def _boxes():
    return random_boxes(4), random_scores(4)


def test_nms_rejects_boxes_not_n_by_4():
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(4, 3), torch.zeros(4), 0.5)


def test_nms_rejects_scores_of_wrong_length():
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(4, 4), torch.zeros(3), 0.5)


def test_nms_rejects_integer_boxes():
    with pytest.raises(TypeError, match="boxes"):
        nms(torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 0.5)


def test_nms_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="scores"):
        nms(torch.zeros(4, 4), torch.zeros(4, dtype=torch.float64), 0.5)


def test_nms_rejects_non_number_threshold():
    with pytest.raises(TypeError, match="iou_threshold"):
        nms(*_boxes(), "0.5")


def test_nms_rejects_non_tensor():
    with pytest.raises(TypeError, match="boxes"):
        nms([[0, 0, 1, 1]], torch.zeros(1), 0.5)


def test_nms_op_checks_shapes_in_cpp_too():
    with pytest.raises(ValueError, match="pycompress::nms: boxes"):
        torch.ops.pycompress.nms(torch.zeros(4, 3), torch.zeros(4), 0.5)


def test_batched_nms_rejects_idxs_of_wrong_length():
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(*_boxes(), torch.zeros(3, dtype=torch.int64), 0.5)


def test_batched_nms_rejects_float_idxs():
    with pytest.raises(TypeError, match="idxs"):
        batched_nms(*_boxes(), torch.zeros(4), 0.5)


def test_fm_nms_rejects_objectness_not_4d():
    with pytest.raises(ValueError, match="objectness"):
        fm_nms(torch.rand(2, 3, 4), torch.rand(2, 3, 2, 4, 1))


def test_fm_nms_rejects_class_probs_not_5d():
    with pytest.raises(ValueError, match="class_probs"):
        fm_nms(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))


def test_fm_nms_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="class_probs"):
        fm_nms(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 5, 4, 5))


def test_fm_nms_rejects_even_kernel_size():
    with pytest.raises(ValueError, match="kernel_size"):
        fm_nms(*random_map(1, 1, 2, 3, 3), kernel_size=2)


def test_fm_nms_rejects_non_int_kernel_size():
    with pytest.raises(TypeError, match="kernel_size"):
        fm_nms(*random_map(1, 1, 2, 3, 3), kernel_size=3.0)


def test_fm_nms_rejects_integer_objectness():
    obj, probs = random_map(1, 1, 2, 3, 3)
    with pytest.raises(TypeError, match="objectness"):
        fm_nms((obj * 10).long(), probs)


def test_fm_nms_validate_rejects_probabilities_outside_unit_interval():
    obj, probs = random_map(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="objectness"):
        fm_nms(obj * 3 - 1, probs, validate=True)  # logits instead of sigmoid outputs
    with pytest.raises(ValueError, match="class_probs"):
        fm_nms(obj, probs + 1, validate=True)
    assert fm_nms(obj * 3 - 1, probs).shape == obj.shape  # unchecked unless asked


def test_fm_nms_op_checks_kernel_size_in_cpp_too():
    with pytest.raises(ValueError, match="pycompress::fm_nms: kernel_size"):
        torch.ops.pycompress.fm_nms(*random_map(1, 1, 2, 3, 3), 4)


# ---------------------------------------------------------------------------
# Registration, CUDA source


def test_opcheck_nms():
    boxes, scores = random_boxes(50, seed=1), random_scores(50, seed=1)
    torch.library.opcheck(torch.ops.pycompress.nms.default, (boxes, scores, 0.5))


def test_opcheck_batched_nms():
    boxes, scores = random_boxes(50, seed=2), random_scores(50, seed=2)
    idxs = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.pycompress.batched_nms.default, (boxes, scores, idxs, 0.5))


def test_opcheck_fm_nms():
    torch.library.opcheck(torch.ops.pycompress.fm_nms.default, (*random_map(2, 3, 4, 5, 6), 3))


def test_ops_are_exported():
    """The old pycompress.ops names still give the functions, with a DeprecationWarning."""
    for name, fn in (("nms", nms), ("batched_nms", batched_nms), ("fm_nms", fm_nms), ("apply_fm_nms", apply_fm_nms)):
        with pytest.warns(DeprecationWarning, match=f"pycompress.functional.{name}"):
            assert getattr(pycompress.ops, name) is fn
    with pytest.warns(DeprecationWarning):
        from pycompress.ops import nms as old_nms
    assert old_nms is nms


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not found")
def test_cpu_nms_code_has_no_fma():
    """A fused multiply-add rounds once where torchvision rounds twice: none may appear in
    the CPU NMS code (GCC contracts a*b+c at -O3 whenever a product only feeds adds)."""
    lib = next(os.path.join(os.path.dirname(pycompress.__file__), f)
               for f in os.listdir(os.path.dirname(pycompress.__file__)) if f.startswith("_C") and f.endswith(".so"))
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True).stdout
    func, fused = None, set()
    for line in asm.splitlines():
        if line.endswith(">:"):
            func = line
        elif "vfmadd" in line or "vfnmadd" in line or "vfmsub" in line or "vfnmsub" in line:
            fused.add(func)
    nms_funcs = [f for f in asm.splitlines() if f.endswith(">:") and "greedy_sweep" in f]
    assert nms_funcs or "nms_groups" in asm  # the sweep is there (possibly inlined into nms_groups)
    assert not [f for f in fused if "nms" in f or "sweep" in f or "compact" in f]


def test_fm_nms_nan_objectness_ranks_lowest():
    """A NaN cell must not suppress the real detection next to it (it used to be visited first)."""
    obj = torch.full((1, 1, 3, 3), 0.1)
    obj[0, 0, 1, 1] = float("nan")
    obj[0, 0, 1, 2] = 0.9
    probs = torch.zeros(1, 1, 2, 3, 3)
    probs[:, :, 0] = 1.0  # one class everywhere
    keep = fm_nms(obj, probs, 3)
    assert keep[0, 0, 1, 2] and not keep[0, 0, 1, 1]
    assert torch.equal(keep, ref_fm_nms(obj, probs, 3))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(fm_nms(obj.to(dtype), probs, 3), keep)


def test_nms_nan_score_ranks_first_as_torch_sort():
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert nms(boxes, torch.tensor([0.5, float("nan"), 0.1]), 0.5).tolist() == [1, 2]
