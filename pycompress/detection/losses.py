"""The detectors' training losses: YOLOv2 (Mehta & Ozturk's form) and SSD.

Both take the raw network output and the targets of :mod:`pycompress.detection.targets`.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["YOLOLoss", "SSDLoss", "yolo_loss", "ssd_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 losses are computed in fp32; fp32 and fp64 in their own precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _yolo_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``(cx, cy, w, h)`` boxes on the last dim (any common unit)."""
    lt = torch.maximum(pred[..., :2] - pred[..., 2:] / 2, target[..., :2] - target[..., 2:] / 2)
    rb = torch.minimum(pred[..., :2] + pred[..., 2:] / 2, target[..., :2] + target[..., 2:] / 2)
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (pred[..., 2:].prod(-1) + target[..., 2:].prod(-1) - inter).clamp(min=1e-12)


def yolo_loss(raw: torch.Tensor, cls: torch.Tensor, box: torch.Tensor, anchors: torch.Tensor, labeled=None,
              lambda_coord: float = 1.0, lambda_obj: float = 5.0, lambda_noobj: float = 1.0, lambda_cls: float = 1.0,
              reduction: str = "mean") -> torch.Tensor:
    """The YOLOv2 loss of docs/yolo_loss.md; see :class:`YOLOLoss`."""
    _check_reduction(reduction)
    if raw.dim() != 5 or raw.shape[2] < 6:
        raise ValueError(f"raw must be (B, A, 5 + C, H, W), got {tuple(raw.shape)}")
    b, a, _, h, w = raw.shape
    if cls.shape != (b, a, h, w) or box.shape != (b, a, 4, h, w):
        raise ValueError(f"targets must be cls {(b, a, h, w)} and box {(b, a, 4, h, w)} for a raw map "
                         f"{tuple(raw.shape)}, got {tuple(cls.shape)} and {tuple(box.shape)}")
    if anchors.shape != (a, 2):
        raise ValueError(f"anchors must be ({a}, 2), got {tuple(anchors.shape)}")
    labeled = (torch.ones(b, dtype=torch.bool, device=raw.device) if labeled is None
               else labeled.to(raw.device, torch.bool))
    resp = (cls >= 0) & labeled[:, None, None, None]
    background = ~resp & labeled[:, None, None, None]
    raw = _upcast(raw)
    xy, twh = torch.sigmoid(raw[:, :, 0:2]), raw[:, :, 2:4]
    obj = torch.sigmoid(raw[:, :, 4])
    probs = torch.softmax(raw[:, :, 5:], dim=2)
    pred_b = torch.cat([xy, twh], 2)
    with torch.no_grad():  # the objectness target: IoU of the decoded prediction with its box, a constant
        anchor_wh = anchors.to(raw)[None, :, :, None, None]
        # the exponent is capped where exp would overflow float32; only absurd predictions reach it
        pred_wh = anchor_wh * torch.exp(twh.clamp(max=30))
        true_wh = anchor_wh * torch.exp(box[:, :, 2:4].to(raw.dtype))
        iou = _yolo_iou(torch.cat([xy, pred_wh], 2).movedim(2, -1),
                        torch.cat([box[:, :, 0:2].to(raw.dtype), true_wh], 2).movedim(2, -1))
    onehot = F.one_hot(cls.clamp(min=0), raw.shape[2] - 5).permute(0, 1, 4, 2, 3).to(probs)
    resp_f, bg_f = resp.to(raw.dtype), background.to(raw.dtype)
    per_anchor = resp_f * (lambda_coord * ((pred_b - box.to(raw.dtype)) ** 2).sum(2)
                           + lambda_obj * (obj - iou) ** 2
                           + lambda_cls * ((probs - onehot) ** 2).sum(2)) + bg_f * lambda_noobj * obj ** 2
    per_image = per_anchor.sum((1, 2, 3))
    if reduction == "none":
        return per_image
    return per_image.sum() / (b if reduction == "mean" else 1)


class YOLOLoss(nn.Module):
    r"""The YOLOv2 loss as Mehta & Ozturk write it: squared errors on boxes, objectness and classes.

    With :math:`o = \sigma(t_o)`, :math:`p = \mathrm{softmax}` of the class logits and
    :math:`b = (\sigma(t_x), \sigma(t_y), t_w, t_h)`, summed over images, anchors and cells:

    .. math::
        \mathbb{1}^{resp} \left[\lambda_{coord} \|b - b^*\|^2 + \lambda_{obj} (o - \mathrm{IoU})^2
        + \lambda_{cls} \textstyle\sum_c (p_c - [c = c^*])^2\right]
        + \mathbb{1}^{noobj} \lambda_{noobj}\, o^2

    where the IoU (decoded prediction against its ground truth) is a constant, responsible
    anchors come from :func:`~pycompress.detection.encode_yolo_targets`, and unlabeled images
    add nothing. This is docs/yolo_loss.md, which fixes the contract.

    Args:
        anchors (Tensor[A, 2]): ``(p_w, p_h)`` in grid cells.
        lambda_coord, lambda_obj, lambda_noobj, lambda_cls (float): term weights (1, 5, 1, 1).
        reduction (str): ``"mean"`` (sum / B images), ``"sum"``, ``"none"`` (``(B,)`` per image).

    Shape:
        - raw: ``(B, A, 5 + C, H, W)``
        - cls: ``(B, A, H, W)`` int64, ``-1`` where no box is assigned
        - box: ``(B, A, 4, H, W)``
        - labeled: ``(B,)`` bool, optional (all True)

    Example:
        >>> loss_fn = model.criterion()                     # YOLOLoss(model.anchors)
        >>> loss = loss_fn(model(images), *model.encode_targets(boxes, labels))
    """

    def __init__(self, anchors: torch.Tensor, lambda_coord: float = 1.0, lambda_obj: float = 5.0,
                 lambda_noobj: float = 1.0, lambda_cls: float = 1.0, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        for name, v in (("lambda_coord", lambda_coord), ("lambda_obj", lambda_obj), ("lambda_noobj", lambda_noobj),
                        ("lambda_cls", lambda_cls)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a float >= 0, got {v!r}")
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32).clone())
        self.lambda_coord, self.lambda_obj, self.lambda_noobj, self.lambda_cls = (
            lambda_coord, lambda_obj, lambda_noobj, lambda_cls)
        self.reduction = reduction

    def forward(self, raw, cls, box, labeled=None):
        return yolo_loss(raw, cls, box, self.anchors, labeled, self.lambda_coord, self.lambda_obj, self.lambda_noobj,
                         self.lambda_cls, self.reduction)

    def extra_repr(self):
        return (f"anchors={len(self.anchors)}, lambda_coord={self.lambda_coord}, lambda_obj={self.lambda_obj}, "
                f"lambda_noobj={self.lambda_noobj}, lambda_cls={self.lambda_cls}, reduction={self.reduction!r}")


def ssd_loss(raw, loc_targets: torch.Tensor, cls_targets: torch.Tensor, neg_pos_ratio: float = 3.0,
             reduction: str = "mean") -> torch.Tensor:
    """The SSD loss; see :class:`SSDLoss`."""
    _check_reduction(reduction)
    if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
        raise TypeError("raw must be the (loc, conf) pair of an SSD detector")
    loc, conf = raw
    if loc.dim() != 3 or loc.shape[2] != 4 or conf.dim() != 3 or conf.shape[:2] != loc.shape[:2]:
        raise ValueError(f"raw must be loc (B, N, 4) and conf (B, N, C + 1), got {tuple(loc.shape)} and "
                         f"{tuple(conf.shape)}")
    if loc_targets.shape != loc.shape or cls_targets.shape != loc.shape[:2]:
        raise ValueError(f"targets must be loc {tuple(loc.shape)} and cls {tuple(loc.shape[:2])}, got "
                         f"{tuple(loc_targets.shape)} and {tuple(cls_targets.shape)}")
    loc, conf = _upcast(loc), _upcast(conf)
    pos, neg = cls_targets > 0, cls_targets == 0
    ce = F.cross_entropy(conf.transpose(1, 2), cls_targets.clamp(min=0), reduction="none")  # (B, N)
    num_pos = pos.sum(1)
    # hard negative mining: per image, the negatives of largest CE, neg_pos_ratio per positive
    # (an image without objects keeps neg_pos_ratio of them, so empty images still teach background)
    num_neg = torch.minimum((neg_pos_ratio * num_pos.clamp(min=1)).long(), neg.sum(1))
    key = ce.detach().masked_fill(~neg, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    hard_neg = neg & (rank < num_neg[:, None])
    box_term = (F.smooth_l1_loss(loc, loc_targets.to(loc.dtype), reduction="none").sum(2) * pos).sum(1)
    cls_term = (ce * (pos | hard_neg)).sum(1)
    per_image = box_term + cls_term
    if reduction == "none":
        return per_image
    total = per_image.sum()
    return total / num_pos.sum().clamp(min=1) if reduction == "mean" else total


class SSDLoss(nn.Module):
    r"""SSD's loss: smooth-L1 on the encoded box offsets of the positive default boxes, plus
    cross-entropy on the positives and the hardest negatives (``neg_pos_ratio`` : 1).

    .. math::
        L = \frac{1}{N_{pos}} \Big(\sum_{i \in pos} \mathrm{smoothL1}(l_i - g_i)
        + \sum_{i \in pos \cup hard} \mathrm{CE}(c_i, y_i)\Big)

    Negatives are ranked per image by their cross-entropy (descending, ties to the lower
    index); an image without objects keeps ``neg_pos_ratio`` negatives; default boxes of
    unlabeled images (``cls == -1``) add nothing.

    Args:
        neg_pos_ratio (float): negatives kept per positive (3).
        reduction (str): ``"mean"`` (divides by the number of positives in the batch, SSD's N),
            ``"sum"``, ``"none"`` (``(B,)`` unnormalised per-image sums).

    Shape:
        - raw: ``(loc (B, N, 4), conf (B, N, C + 1))``
        - loc_targets: ``(B, N, 4)``; cls_targets: ``(B, N)`` int64 (0 = background)
    """

    def __init__(self, neg_pos_ratio: float = 3.0, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        if not isinstance(neg_pos_ratio, (int, float)) or neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be a float >= 0, got {neg_pos_ratio!r}")
        self.neg_pos_ratio, self.reduction = neg_pos_ratio, reduction

    def forward(self, raw, loc_targets, cls_targets):
        return ssd_loss(raw, loc_targets, cls_targets, self.neg_pos_ratio, self.reduction)

    def extra_repr(self):
        return f"neg_pos_ratio={self.neg_pos_ratio}, reduction={self.reduction!r}"
