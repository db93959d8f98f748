"""The fused YOLO / detection-distillation loss against a plain-PyTorch reference (values and gradients)."""

import itertools

import pytest
import torch

from pycompress.functional import detection_distill_loss, teacher_fm_nms_keep
from pycompress.nn import DetectionDistillLoss
from pycompress.functional import fm_nms

# (value rtol, value atol, grad rtol, grad atol) against a float64 reference. bf16 inputs
# are rounded before the reference sees them; their outputs are rounded to bf16.
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-4, 1e-6),
    torch.bfloat16: (1e-2, 1e-2, 2e-2, 2e-3),
}
OPTIONS = ("fm_nms", "objectness_scaling", "suppress_objectness")


def _iou_same_cell(pred_xywh, gt_xywh, anchors):
    """IoU of (sx, sy, tw, th) boxes with (x*, y*, w*, h*) targets centred in the same cell, grid units."""
    pw = anchors[:, 0].reshape(1, -1, 1, 1)
    ph = anchors[:, 1].reshape(1, -1, 1, 1)
    x1, y1 = pred_xywh[:, :, 0], pred_xywh[:, :, 1]
    w1, h1 = pw * pred_xywh[:, :, 2].exp(), ph * pred_xywh[:, :, 3].exp()
    x2, y2 = gt_xywh[:, :, 0], gt_xywh[:, :, 1]
    w2, h2 = pw * gt_xywh[:, :, 2].exp(), ph * gt_xywh[:, :, 3].exp()
    ix = (torch.minimum(x1 + w1 / 2, x2 + w2 / 2) - torch.maximum(x1 - w1 / 2, x2 - w2 / 2)).clamp_min(0)
    iy = (torch.minimum(y1 + h1 / 2, y2 + h2 / 2) - torch.maximum(y1 - h1 / 2, y2 - h2 / 2)).clamp_min(0)
    inter = ix * iy
    return inter / (w1 * h1 + w2 * h2 - inter)


def _activations(raw):
    """(b, o, p): box (sigmoid tx, ty; raw tw, th), objectness and class probabilities of a raw map."""
    b = torch.cat([torch.sigmoid(raw[:, :, :2]), raw[:, :, 2:4]], dim=2)
    return b, torch.sigmoid(raw[:, :, 4]), torch.softmax(raw[:, :, 5:], dim=2)


def reference_detection_distill_loss(student, teacher, anchors, cls, box, labeled, *, fm_nms=True,
                                     objectness_scaling=True, suppress_objectness=False, lambda_distill=1.0,
                                     lambda_coord=1.0, lambda_obj=5.0, lambda_noobj=1.0, lambda_cls=1.0,
                                     reduction="mean", fm_nms_fn=fm_nms):
    """docs/yolo_loss.md in eager PyTorch, in the inputs' dtype. ``fm_nms_fn(o_T, p_T, K)`` gives
    the keep mask (the pycompress op here; the benchmark passes a pure-PyTorch one)."""
    C = student.shape[2] - 5
    b, o, p = _activations(student)
    lab = labeled.reshape(-1, 1, 1, 1)
    resp = ((cls >= 0) & lab).to(student.dtype)
    noobj = ((cls < 0) & lab).to(student.dtype)
    iou = _iou_same_cell(b.detach(), box, anchors.to(student.dtype)).detach()
    onehot = torch.nn.functional.one_hot(cls.clamp_min(0), C).permute(0, 1, 4, 2, 3).to(student.dtype)
    cell = resp * (lambda_coord * ((b - box) ** 2).sum(2) + lambda_obj * (o - iou) ** 2
                   + lambda_cls * ((p - onehot) ** 2).sum(2)) + noobj * lambda_noobj * o ** 2
    if teacher is not None:
        b_t, o_t, p_t = _activations(teacher.detach())
        if fm_nms:
            keep = fm_nms_fn(o_t, p_t, 3)
            p_t = p_t * keep.unsqueeze(2)
            if suppress_objectness:
                o_t = o_t * keep
        scale = o_t if objectness_scaling else 1.0
        cell = cell + lambda_distill * ((o - o_t) ** 2 + scale * lambda_cls * ((p - p_t) ** 2).sum(2)
                                        + scale * lambda_coord * ((b - b_t) ** 2).sum(2))
    image = cell.sum((1, 2, 3))
    if reduction == "none":
        return image
    return image.sum() / (student.shape[0] if reduction == "mean" and student.shape[0] else 1)


def make_inputs(B=3, A=2, C=4, H=5, W=7, dtype=torch.float32, seed=0, objects=4, labeled=None):
    """Random maps and targets in the encoder's format: `objects` responsible anchors per labeled image."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, A, 5 + C, H, W, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, A, 5 + C, H, W, generator=g, dtype=torch.float64) * 2
    anchors = torch.rand(A, 2, generator=g, dtype=torch.float64) * 3 + 0.5
    labeled = torch.ones(B, dtype=torch.bool) if labeled is None else torch.tensor(labeled)
    cls = torch.full((B, A, H, W), -1, dtype=torch.int64)
    box = torch.zeros(B, A, 4, H, W, dtype=torch.float64)
    for i in range(B):
        if not labeled[i]:
            continue
        for flat in torch.randperm(A * H * W, generator=g)[:objects].tolist():
            a, h, w = flat // (H * W), (flat // W) % H, flat % W
            cls[i, a, h, w] = int(torch.randint(C, (1,), generator=g))
            box[i, a, :2, h, w] = torch.rand(2, generator=g, dtype=torch.float64)
            box[i, a, 2:, h, w] = torch.randn(2, generator=g, dtype=torch.float64) * 0.5
    return student.to(dtype), teacher.to(dtype), anchors.float(), cls, box.to(dtype), labeled


def _fused_and_reference(dtype, teacher=True, reduction="mean", **opts):
    s, t, anchors, cls, box, labeled = make_inputs(dtype=dtype, **opts.pop("inputs", {}))
    t = t if teacher else None
    s_fused = s.clone().requires_grad_()
    loss = detection_distill_loss(s_fused, t, anchors, cls, box, labeled, reduction=reduction, **opts)
    (loss.sum() if reduction == "none" else loss).backward()
    s_ref = s.double().requires_grad_()
    # The mask of the teacher in its own dtype, as the fused path computes it (rounding can create
    # objectness ties that a float64 teacher would not have); fm_nms itself is tested in test_nms.py.
    keep = None if t is None else teacher_fm_nms_keep(t)
    ref = reference_detection_distill_loss(s_ref, None if t is None else t.double(), anchors.double(), cls,
                                           box.double(), labeled, reduction=reduction,
                                           fm_nms_fn=lambda *_: keep, **opts)
    (ref.sum() if reduction == "none" else ref).backward()
    return loss, s_fused.grad, ref, s_ref.grad


def _assert_close(dtype, loss, grad, ref, ref_grad):
    rtol, atol, grtol, gatol = TOL[dtype]
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grtol, atol=gatol)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "-".join(n for n, on in zip(OPTIONS, f) if on) or "plain")
def test_every_option_matches_reference(flags):
    opts = dict(zip(OPTIONS, flags))
    _assert_close(torch.float32, *_fused_and_reference(torch.float32, **opts))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dtypes_and_reductions(dtype, reduction):
    _assert_close(dtype, *_fused_and_reference(dtype, reduction=reduction))


def test_plain_yolo_loss_without_teacher():
    _assert_close(torch.float32, *_fused_and_reference(torch.float32, teacher=False))


def test_odd_shape_and_weights():
    # HW = 13 * 13 = 169 is not a multiple of the vector width; C = 20 as VOC.
    _assert_close(torch.float32, *_fused_and_reference(
        torch.float32, reduction="none", lambda_distill=0.5, lambda_coord=2.0, lambda_obj=3.0, lambda_noobj=0.25,
        lambda_cls=1.5, inputs=dict(B=2, A=5, C=20, H=13, W=13, objects=9)))


def test_unlabeled_images_get_only_teacher_terms():
    s, t, anchors, cls, box, _ = make_inputs(B=2)
    labeled = torch.tensor([True, False])
    cls[1, 0, 1, 2], box[1, 0, :, 1, 2] = 1, 0.5  # the unlabeled image's targets are ignored, whatever they hold
    per_image = detection_distill_loss(s, t, anchors, cls, box, labeled, reduction="none")
    teacher_only = detection_distill_loss(s, t, anchors, cls, box, labeled, reduction="none",
                                          lambda_coord=1.0, lambda_obj=0.0, lambda_noobj=0.0)
    ref = reference_detection_distill_loss(s.double(), t.double(), anchors.double(), cls, box.double(),
                                           labeled, reduction="none")
    torch.testing.assert_close(per_image.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_image[1], teacher_only[1])
    assert detection_distill_loss(s, None, anchors, cls, box, labeled, reduction="none")[1] == 0


def test_empty_images_only_noobj_and_teacher_terms():
    s, t, anchors, cls, box, labeled = make_inputs(objects=0)
    _assert_close(torch.float32, *_fused_and_reference(torch.float32, inputs=dict(objects=0)))
    yolo = detection_distill_loss(s, None, anchors, cls, box, labeled, reduction="none")
    torch.testing.assert_close(yolo, (torch.sigmoid(s[:, :, 4]) ** 2).sum((1, 2, 3)))


def test_gradcheck_float64():
    # The IoU in the objectness target is a constant of the gradient (docs/yolo_loss.md), so finite
    # differences, which see it move, agree only with lambda_obj = 0; the reference tests cover the rest.
    s, t, anchors, cls, box, labeled = make_inputs(B=2, A=2, C=3, H=3, W=4, dtype=torch.float64, objects=3,
                                                   labeled=[True, False])
    s.requires_grad_()
    for teacher, obj_scaling in ((t, True), (t, False), (None, True)):
        assert torch.autograd.gradcheck(
            lambda x: detection_distill_loss(x, teacher, anchors, cls, box, labeled, reduction="none",
                                             objectness_scaling=obj_scaling, lambda_obj=0.0), (s,))


def test_module_matches_functional_and_repr():
    s, t, anchors, cls, box, labeled = make_inputs()
    loss_fn = DetectionDistillLoss(anchors, fm_nms=False, lambda_distill=0.5, reduction="sum")
    torch.testing.assert_close(loss_fn(s, t, cls, box, labeled), detection_distill_loss(
        s, t, anchors, cls, box, labeled, fm_nms=False, lambda_distill=0.5, reduction="sum"))
    assert "fm_nms=False" in repr(loss_fn) and "reduction='sum'" in repr(loss_fn)
    # Without labeled every image is labeled.
    torch.testing.assert_close(loss_fn(s, None, cls, box), loss_fn(s, None, cls, box, labeled))


def test_opcheck():
    s, t, anchors, cls, box, labeled = make_inputs(B=2, C=3, H=3, W=4)
    keep = fm_nms(torch.sigmoid(t[:, :, 4]), torch.softmax(t[:, :, 5:], dim=2), 3)
    for teacher, k, reduction in ((t, keep, "mean"), (t, None, "none"), (None, None, "sum")):
        args = (s.clone().requires_grad_(), teacher, k, anchors, cls, box, labeled, True, False, 1.0, 1.0, 5.0, 1.0,
                1.0, reduction, True)
        torch.library.opcheck(torch.ops.pycompress.detection_distill_loss.default, args)


def test_torch_compile_fullgraph():
    s, t, anchors, cls, box, labeled = make_inputs()
    fn = torch.compile(lambda x: detection_distill_loss(x, t, anchors, cls, box, labeled), fullgraph=True)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    fn(x1).backward()
    detection_distill_loss(x2, t, anchors, cls, box, labeled).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_matches_reference(dtype):
    from pycompress.kernels.detection_loss import detection_distill_loss_triton

    s, t, anchors, cls, box, labeled = make_inputs(B=2, A=3, C=5, H=6, W=7, dtype=dtype, labeled=[True, False])
    keep = fm_nms(torch.sigmoid(t[:, :, 4]), torch.softmax(t[:, :, 5:], dim=2), 3)
    for teacher, k, reduction in ((t, keep, "none"), (t, None, "mean"), (None, None, "sum")):
        args = (s, teacher, k, anchors, cls, box, labeled, True, k is not None, 1.0, 1.0, 5.0, 1.0, 1.0, reduction,
                True)
        loss, grad = detection_distill_loss_triton(*args)
        ref_loss, ref_grad = torch.ops.pycompress.detection_distill_loss(*args)
        rtol, atol, grtol, gatol = TOL[dtype]
        torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=grtol, atol=gatol)


BAD = [
    (dict(student=torch.zeros(2, 2, 5, 3, 3)), ValueError, "student_raw"),
    (dict(student=torch.zeros(2, 2, 8, 3, 3, dtype=torch.int64)), TypeError, "student_raw"),
    (dict(teacher=torch.zeros(2, 2, 8, 3, 4)), ValueError, "teacher_raw"),
    (dict(teacher=torch.zeros(2, 2, 8, 3, 3, dtype=torch.float64)), TypeError, "teacher_raw"),
    (dict(anchors=torch.ones(3, 2)), ValueError, "anchors"),
    (dict(anchors=torch.tensor([[1.0, 1.0], [0.0, 1.0]])), ValueError, "anchors"),
    (dict(cls=torch.zeros(2, 2, 3, 3, dtype=torch.int32)), TypeError, "cls"),
    (dict(cls=torch.full((2, 2, 3, 3), 3, dtype=torch.int64)), ValueError, "cls"),
    (dict(cls=torch.full((2, 2, 3, 3), -2, dtype=torch.int64)), ValueError, "cls"),
    (dict(box=torch.zeros(2, 2, 3, 3, 3)), ValueError, "box"),
    (dict(labeled=torch.ones(2)), TypeError, "labeled"),
    (dict(labeled=torch.ones(3, dtype=torch.bool)), ValueError, "labeled"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(fm_nms=1), TypeError, "fm_nms"),
    (dict(lambda_distill=-1.0), ValueError, "lambda_distill"),
    (dict(lambda_obj="5"), TypeError, "lambda_obj"),
]


@pytest.mark.parametrize("change,error,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_inputs(change, error, name):
    args = dict(student=torch.zeros(2, 2, 8, 3, 3), teacher=torch.zeros(2, 2, 8, 3, 3), anchors=torch.ones(2, 2),
                cls=torch.full((2, 2, 3, 3), -1, dtype=torch.int64), box=torch.zeros(2, 2, 4, 3, 3),
                labeled=torch.ones(2, dtype=torch.bool))
    opts = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=name):
        detection_distill_loss(args["student"], args["teacher"], args["anchors"], args["cls"], args["box"],
                               args["labeled"], **opts)


def test_module_rejects_bad_anchors():
    with pytest.raises(ValueError, match="anchors"):
        DetectionDistillLoss(torch.ones(3))


def test_double_backward_is_refused_naming_the_op():
    torch.manual_seed(0)
    B, A, C, H, W = 1, 2, 3, 2, 2
    student = torch.randn(B, A, 5 + C, H, W, requires_grad=True)
    anchors = torch.tensor([[1.0, 1.0], [2.0, 1.5]])
    cls = torch.full((B, A, H, W), -1, dtype=torch.int64)
    box = torch.zeros(B, A, 4, H, W)
    loss = detection_distill_loss(student, None, anchors, cls, box)
    with pytest.raises(RuntimeError, match="detection_distill_loss: double backward"):
        torch.autograd.grad(loss, student, create_graph=True)
