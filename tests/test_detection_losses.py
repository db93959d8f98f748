"""Target encoding and the YOLO / SSD losses against brute-force float64 references."""

import math

import pytest
import torch

from pycompress.detection import (SSDLoss, YOLOLoss, decode_ssd_boxes, decode_yolo_boxes, encode_ssd_targets,
                                  encode_yolo_targets)
from pycompress.models.detection import ssd_default_boxes

ANCHORS = torch.tensor([[1.0, 1.5], [2.0, 2.5]])
STRIDE = 8
GRID = (4, 5)  # H, W: an odd, non-square map


def random_boxes(n, h_px, w_px, g, min_side=4.0):
    x1 = torch.rand(n, generator=g) * (w_px - min_side - 1)
    y1 = torch.rand(n, generator=g) * (h_px - min_side - 1)
    w = min_side + torch.rand(n, generator=g) * (w_px - x1 - min_side)
    h = min_side + torch.rand(n, generator=g) * (h_px - y1 - min_side)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def yolo_batch(seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    boxes = [random_boxes(k, GRID[0] * STRIDE, GRID[1] * STRIDE, g) for k in (3, 0, 5)]
    labels = [torch.randint(0, classes, (len(b),), generator=g) for b in boxes]
    raw = torch.randn(3, len(ANCHORS), 5 + classes, *GRID, generator=g, dtype=torch.float64)
    return boxes, labels, raw


# ------------------------------------------------------------------ brute-force references
def _sig(v):
    return 1 / (1 + torch.exp(-v))


def _iou_cxcywh(a, b):
    iw = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    ih = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def reference_yolo_loss(raw, cls, box, anchors, labeled, lc=1.0, lo=5.0, ln=1.0, lk=1.0):
    b_n, a_n, _, h_n, w_n = raw.shape
    per_image = []
    for b in range(b_n):
        total = raw.new_zeros(())
        for a in range(a_n):
            for i in range(h_n):
                for j in range(w_n):
                    v = raw[b, a, :, i, j]
                    o = _sig(v[4])
                    if not labeled[b]:
                        continue
                    c = int(cls[b, a, i, j])
                    if c < 0:
                        total = total + ln * o ** 2
                        continue
                    t = box[b, a, :, i, j].double()
                    pred = [_sig(v[0]), _sig(v[1]), v[2], v[3]]
                    coord = sum((p - q) ** 2 for p, q in zip(pred, t))
                    pw, ph = float(anchors[a, 0]), float(anchors[a, 1])
                    pf, vf = [float(q.detach()) for q in pred], v.detach().tolist()
                    iou = _iou_cxcywh([pf[0], pf[1], pw * math.exp(vf[2]), ph * math.exp(vf[3])],
                                      [float(t[0]), float(t[1]), pw * math.exp(float(t[2])), ph * math.exp(float(t[3]))])
                    logits = v[5:]
                    p = torch.exp(logits - logits.max())
                    p = p / p.sum()
                    cl = sum((p[k] - (1.0 if k == c else 0.0)) ** 2 for k in range(len(p)))
                    total = total + lc * coord + lo * (o - iou) ** 2 + lk * cl
        per_image.append(total)
    return torch.stack(per_image)


def reference_ssd_loss(loc, conf, loc_t, cls_t, ratio=3.0):
    per_image, positives = [], 0
    for b in range(loc.shape[0]):
        n = loc.shape[1]
        ce = [-(conf[b, k] - conf[b, k].max() - torch.log(torch.exp(conf[b, k] - conf[b, k].max()).sum()))[
            max(int(cls_t[b, k]), 0)] for k in range(n)]
        pos = [k for k in range(n) if cls_t[b, k] > 0]
        neg = [k for k in range(n) if cls_t[b, k] == 0]
        keep = min(int(ratio * max(len(pos), 1)), len(neg))
        hard = sorted(neg, key=lambda k: (-float(ce[k].detach()), k))[:keep]
        total = loc.new_zeros(())
        for k in pos:
            d = (loc[b, k] - loc_t[b, k]).abs()
            total = total + torch.where(d < 1, 0.5 * d ** 2, d - 0.5).sum()
        for k in pos + hard:
            total = total + ce[k]
        per_image.append(total)
        positives += len(pos)
    return torch.stack(per_image), positives


# ------------------------------------------------------------------ YOLO
def test_yolo_encoding_rules():
    # two boxes centred in cell (1, 1) with the same best anchor: the larger keeps the slot
    boxes = [torch.tensor([[9.0, 9.0, 14.0, 16.0], [8.5, 8.0, 15.5, 17.0], [20.0, 0.0, 40.0, 24.0]])]
    labels = [torch.tensor([0, 1, 2])]
    t = encode_yolo_targets(boxes, labels, ANCHORS, grid=GRID, stride=STRIDE)
    assert t.dropped == 1
    assert t.cls[0, 0, 1, 1] == 1  # the larger box
    assert (t.cls >= 0).sum() == 2
    big = t.cls[0, :, 1, 3]  # centre (30, 12) -> cell (1, 3), anchor 1 (16x20 px) fits a 20x24 box best
    assert big.tolist() == [-1, 2]
    x, y, w, h = t.box[0, 1, :, 1, 3].tolist()
    assert x == pytest.approx(30 / 8 - 3) and y == pytest.approx(12 / 8 - 1)
    assert w == pytest.approx(math.log(20 / 16)) and h == pytest.approx(math.log(24 / 20))
    assert bool(t.labeled.all())


def test_yolo_anchor_ties_go_to_the_lower_index():
    anchors = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # a square box matches both equally
    t = encode_yolo_targets([torch.tensor([[0.0, 0.0, 12.0, 12.0]])], [torch.tensor([4])], anchors, grid=GRID,
                            stride=STRIDE)
    assert t.cls[0, 0, 0, 0] == 4 and t.cls[0, 1, 0, 0] == -1


def test_yolo_encode_decode_round_trip():
    boxes, labels, _ = yolo_batch(1)
    t = encode_yolo_targets(boxes, labels, ANCHORS, grid=GRID, stride=STRIDE)
    raw = torch.zeros(3, len(ANCHORS), 8, *GRID, dtype=torch.float64)
    raw[:, :, 0:2] = torch.logit(t.box[:, :, 0:2].double().clamp(1e-9, 1 - 1e-9))
    raw[:, :, 2:4] = t.box[:, :, 2:4].double()
    decoded = decode_yolo_boxes(raw, ANCHORS, STRIDE)  # (B, A, H, W, 4)
    assert int((t.cls >= 0).sum()) == sum(len(b) for b in boxes) - t.dropped
    for n in range(3):
        for box, label in zip(decoded[n][t.cls[n] >= 0], t.cls[n][t.cls[n] >= 0]):
            assert (torch.isclose(boxes[n].double(), box, atol=1e-5).all(1) & (labels[n] == label)).any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_yolo_loss_matches_brute_force_with_gradients(reduction):
    boxes, labels, raw = yolo_batch(2)
    t = encode_yolo_targets(boxes, labels, ANCHORS, grid=GRID, stride=STRIDE)
    labeled = torch.tensor([True, True, False])
    raw_a, raw_b = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    got = YOLOLoss(ANCHORS, reduction=reduction)(raw_a, t.cls, t.box, labeled)
    per_image = reference_yolo_loss(raw_b, t.cls, t.box, ANCHORS, labeled)
    ref = {"mean": per_image.sum() / 3, "sum": per_image.sum(), "none": per_image}[reduction]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    weights = torch.arange(1.0, 4.0, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0).double()
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(raw_a.grad, raw_b.grad, rtol=1e-9, atol=1e-10)
    assert float(raw_a.grad[2].abs().max()) == 0  # the unlabeled image: no ground-truth term


def test_yolo_loss_custom_weights_and_gradcheck():
    boxes, labels, raw = yolo_batch(3)
    raw = raw[:, :, :, :2, :3].contiguous()
    t = encode_yolo_targets([b[(b[:, 2] <= 24) & (b[:, 3] <= 16)] for b in boxes],
                            [lab[(b[:, 2] <= 24) & (b[:, 3] <= 16)] for b, lab in zip(boxes, labels)],
                            ANCHORS, grid=(2, 3), stride=STRIDE)
    fn = YOLOLoss(ANCHORS, lambda_coord=2.0, lambda_obj=3.0, lambda_noobj=0.5, lambda_cls=0.7, reduction="sum")
    ref = reference_yolo_loss(raw, t.cls, t.box, ANCHORS, torch.ones(3, dtype=torch.bool), 2.0, 3.0, 0.5, 0.7).sum()
    torch.testing.assert_close(fn(raw, t.cls, t.box), ref)
    # the IoU target is a constant, which finite differences cannot see: gradcheck without that term
    # (the brute-force test above checks its gradient)
    no_iou = YOLOLoss(ANCHORS, lambda_coord=2.0, lambda_obj=0.0, lambda_noobj=0.5, lambda_cls=0.7)
    assert torch.autograd.gradcheck(lambda r: no_iou(r, t.cls, t.box), (raw.clone().requires_grad_(),))


def test_yolo_empty_targets_are_valid():
    raw = torch.randn(2, 2, 8, *GRID, dtype=torch.float64, requires_grad=True)
    t = encode_yolo_targets([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2,
                            ANCHORS, grid=GRID, stride=STRIDE)
    assert (t.cls == -1).all() and t.dropped == 0
    loss = YOLOLoss(ANCHORS, reduction="sum")(raw, t.cls, t.box)
    torch.testing.assert_close(loss, (torch.sigmoid(raw[:, :, 4]) ** 2).sum())
    loss.backward()
    assert raw.grad[:, :, 5:].abs().max() == 0


def test_yolo_padded_targets_equal_lists():
    boxes, labels, _ = yolo_batch(4)
    padded_b = torch.zeros(3, 6, 4)
    padded_l = torch.full((3, 6), -1)
    for n, (b, lab) in enumerate(zip(boxes, labels)):
        padded_b[n, :len(b)], padded_l[n, :len(b)] = b, lab
    a = encode_yolo_targets(boxes, labels, ANCHORS, grid=GRID, stride=STRIDE)
    b = encode_yolo_targets(padded_b, padded_l, ANCHORS, grid=GRID, stride=STRIDE)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.box, b.box)


@pytest.mark.parametrize("boxes, labels, match", [
    ([[-1.0, 0.0, 5.0, 5.0]], [0], "inside"),
    ([[0.0, 0.0, 41.0, 5.0]], [0], "inside"),
    ([[5.0, 5.0, 5.0, 9.0]], [0], "x2 > x1"),
    ([[0.0, 0.0, 5.0, float("nan")]], [0], "finite"),
    ([[0.0, 0.0, 5.0, 5.0]], [10], "labels"),
    ([[0.0, 0.0, 5.0, 5.0]], [-2], "labels"),
    ([[0.0, 0.0, 5.0]], [0], r"\(M, 4\)"),
])
def test_yolo_bad_targets(boxes, labels, match):
    with pytest.raises(ValueError, match=match):
        encode_yolo_targets([torch.tensor(boxes)], [torch.tensor(labels)], ANCHORS, grid=GRID, stride=STRIDE,
                            num_classes=10)


def test_yolo_loss_bad_inputs():
    boxes, labels, raw = yolo_batch(5)
    t = encode_yolo_targets(boxes, labels, ANCHORS, grid=GRID, stride=STRIDE)
    with pytest.raises(ValueError, match="targets"):
        YOLOLoss(ANCHORS)(raw[:, :, :, :3], t.cls, t.box)
    with pytest.raises(ValueError, match="reduction"):
        YOLOLoss(ANCHORS, reduction="batchmean")
    with pytest.raises(ValueError, match="lambda_obj"):
        YOLOLoss(ANCHORS, lambda_obj=-1)
    with pytest.raises(TypeError, match="labels"):
        encode_yolo_targets([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [torch.tensor([1.0])], ANCHORS, grid=GRID,
                            stride=STRIDE)


# ------------------------------------------------------------------ SSD
def ssd_setup(seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    defaults = ssd_default_boxes(32, (8, 16), (0.25, 0.5), (1.0, 0.5))
    boxes = [random_boxes(k, 32, 32, g) for k in (2, 0, 3)]
    labels = [torch.randint(0, classes, (len(b),), generator=g) for b in boxes]
    n = len(defaults)
    loc = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    conf = torch.randn(3, n, classes + 1, generator=g, dtype=torch.float64)
    return defaults, boxes, labels, loc, conf


def test_ssd_matching_and_round_trip():
    defaults, boxes, labels, _, _ = ssd_setup(1)
    loc_t, cls_t = encode_ssd_targets(boxes, labels, defaults, image_size=32)
    assert (cls_t[1] == 0).all()  # the image without objects: all background
    for n in (0, 2):
        decoded = decode_ssd_boxes(loc_t[n], defaults)[cls_t[n] > 0]
        for d, c in zip(decoded, cls_t[n][cls_t[n] > 0]):  # each positive decodes to a ground-truth box
            match = torch.isclose(boxes[n], d, atol=1e-4).all(1) & (labels[n] + 1 == c)
            assert match.any()
        # every ground-truth box has at least its best default box
        from pycompress.detection import box_iou
        from pycompress.detection.targets import _cxcywh_to_xyxy
        best = box_iou(boxes[n], _cxcywh_to_xyxy(defaults)).argmax(1)
        assert (cls_t[n][best] > 0).all()
    _, cls_u = encode_ssd_targets(boxes, labels, defaults, image_size=32, labeled=torch.tensor([True, False, True]))
    assert (cls_u[1] == -1).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ssd_loss_matches_brute_force_with_gradients(reduction):
    defaults, boxes, labels, loc, conf = ssd_setup(2)
    loc_t, cls_t = encode_ssd_targets(boxes, labels, defaults, image_size=32,
                                      labeled=torch.tensor([True, True, False]))
    la, ca = loc.clone().requires_grad_(), conf.clone().requires_grad_()
    lb, cb = loc.clone().requires_grad_(), conf.clone().requires_grad_()
    got = SSDLoss(reduction=reduction)((la, ca), loc_t.double(), cls_t)
    per_image, positives = reference_ssd_loss(lb, cb, loc_t.double(), cls_t)
    ref = {"mean": per_image.sum() / positives, "sum": per_image.sum(), "none": per_image}[reduction]
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(la.grad, lb.grad)
    torch.testing.assert_close(ca.grad, cb.grad)
    assert ca.grad[2].abs().max() == 0  # unlabeled image
    assert ca.grad[1].abs().sum() > 0  # the empty image still mines its hardest negatives


def test_ssd_loss_ratio_and_bad_inputs():
    defaults, boxes, labels, loc, conf = ssd_setup(3)
    loc_t, cls_t = encode_ssd_targets(boxes, labels, defaults, image_size=32)
    got = SSDLoss(neg_pos_ratio=1.0, reduction="sum")((loc, conf), loc_t.double(), cls_t)
    torch.testing.assert_close(got, reference_ssd_loss(loc, conf, loc_t.double(), cls_t, 1.0)[0].sum())
    with pytest.raises(TypeError, match="raw"):
        SSDLoss()(loc, loc_t, cls_t)
    with pytest.raises(ValueError, match="targets"):
        SSDLoss()((loc, conf), loc_t[:, :-1], cls_t)
    with pytest.raises(ValueError, match="neg_pos_ratio"):
        SSDLoss(neg_pos_ratio=-1)
    with pytest.raises(ValueError, match="inside"):
        encode_ssd_targets([torch.tensor([[0.0, 0.0, 33.0, 4.0]])], [torch.tensor([0])], defaults, image_size=32)
