"""Ground truth in the forms the detectors' losses take, and the box decoders.

- YOLO: :func:`encode_yolo_targets` follows docs/yolo_loss.md exactly (responsible
  cell and anchor, larger box wins a contested slot, drops counted);
  :func:`decode_yolo_boxes` is the map's decode.
- SSD: :func:`encode_ssd_targets` matches default boxes to ground truth (each box
  gets its best default box; every default box with IoU >= 0.5 gets its best box)
  and encodes offsets with SSD's variances; :func:`decode_ssd_boxes` inverts it.

Ground truth comes per image, either as lists of ``(M_i, 4)`` boxes and ``(M_i,)``
labels, or padded as ``(B, M, 4)`` and ``(B, M)`` with label ``-1`` marking padding
(the layout of :class:`pycompress.data.DetectionDataset`). An image with no box is
valid. ``labeled`` (``(B,)`` bool) marks the images whose boxes are known; an
unlabeled image contributes no ground-truth term.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["YOLOTargets", "encode_yolo_targets", "decode_yolo_boxes", "encode_ssd_targets", "decode_ssd_boxes",
           "box_iou", "per_image_targets"]

SSD_VARIANCES = (0.1, 0.2)


class YOLOTargets(NamedTuple):
    cls: torch.Tensor      # (B, A, H, W) int64, -1 where no box is assigned
    box: torch.Tensor      # (B, A, 4, H, W) float32 (x*, y*, w*, h*)
    labeled: torch.Tensor  # (B,) bool
    dropped: int           # boxes that lost a contested (cell, anchor) slot


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of ``(x1, y1, x2, y2)`` boxes ``a (N, 4)`` and ``b (M, 4)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def per_image_targets(boxes, labels, image_size: Tuple[float, float], num_classes: Optional[int] = None
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Validated per-image ``(boxes (M_i, 4) float32, labels (M_i,) int64)`` lists.

    Args:
        boxes: list of ``(M_i, 4)`` tensors, or a padded ``(B, M, 4)`` tensor.
        labels: list of ``(M_i,)`` tensors, or a padded ``(B, M)`` tensor (``-1`` = padding).
        image_size ((height, width)): boxes must lie inside ``[0, width] x [0, height]``.
        num_classes (int, optional): labels must lie in ``0..num_classes-1``.

    Raises:
        ValueError: shapes disagree, a box is empty, inverted, not finite or outside the
            image, or a label is out of range.
        TypeError: labels are not integers.
    """
    if isinstance(boxes, torch.Tensor) and isinstance(labels, torch.Tensor) and boxes.dim() == 3:
        if labels.dim() != 2 or boxes.shape[:2] != labels.shape or boxes.shape[2] != 4:
            raise ValueError(f"padded boxes must be (B, M, 4) and labels (B, M), got {tuple(boxes.shape)} and "
                             f"{tuple(labels.shape)}")
        keep = labels >= 0
        boxes, labels = [b[k] for b, k in zip(boxes, keep)], [lab[k] for lab, k in zip(labels, keep)]
    if not isinstance(boxes, (list, tuple)) or not isinstance(labels, (list, tuple)) or len(boxes) != len(labels):
        raise ValueError("boxes and labels must be padded tensors (B, M, 4) / (B, M) or two lists of one tensor "
                         "per image, of the same length")
    h, w = image_size
    out_b, out_l = [], []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b, lab = torch.as_tensor(b), torch.as_tensor(lab)
        if b.numel() == 0 and lab.numel() == 0:  # an image without objects
            out_b.append(torch.zeros(0, 4))
            out_l.append(torch.zeros(0, dtype=torch.int64))
            continue
        if b.dim() != 2 or b.shape[1] != 4 or lab.dim() != 1 or len(lab) != len(b):
            raise ValueError(f"image {i}: boxes must be (M, 4) and labels (M,), got {tuple(b.shape)} and "
                             f"{tuple(lab.shape)}")
        if lab.is_floating_point() or lab.dtype == torch.bool:
            raise TypeError(f"image {i}: labels must be integers, got {lab.dtype}")
        b = b.float()
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"image {i}: boxes must be finite")
        if bool(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any()):
            raise ValueError(f"image {i}: boxes must have x2 > x1 and y2 > y1, got {b.tolist()}")
        if bool(((b[:, :2] < 0).any(1) | (b[:, 2] > w) | (b[:, 3] > h)).any()):
            raise ValueError(f"image {i}: boxes must lie inside the {h}x{w} image, got {b.tolist()}")
        if bool((lab < 0).any()) or (num_classes is not None and bool((lab >= num_classes).any())):
            raise ValueError(f"image {i}: labels must be in 0..{'C-1' if num_classes is None else num_classes - 1}, "
                             f"got {lab.tolist()}")
        out_b.append(b)
        out_l.append(lab.long())
    return out_b, out_l


def _labeled_mask(labeled, batch: int, device) -> torch.Tensor:
    if labeled is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    labeled = torch.as_tensor(labeled, device=device)
    if labeled.shape != (batch,) or labeled.dtype != torch.bool:
        raise ValueError(f"labeled must be a ({batch},) bool tensor, got {tuple(labeled.shape)} {labeled.dtype}")
    return labeled


def encode_yolo_targets(boxes, labels, anchors: torch.Tensor, grid: Sequence[int], stride: float, labeled=None,
                        num_classes: Optional[int] = None) -> YOLOTargets:
    """Responsible-anchor targets of the YOLO map (docs/yolo_loss.md, "Encoded targets").

    Each box goes to the cell holding its centre and to the anchor whose shape has the
    highest IoU with the box's shape (both centred at the origin; ties to the lower
    anchor). A (cell, anchor) slot claimed twice goes to the larger box (ties: the
    earlier one); the other is dropped and counted.

    Args:
        boxes, labels: per-image ground truth (see :func:`per_image_targets`), pixels.
        anchors (Tensor[A, 2]): ``(p_w, p_h)`` in grid cells.
        grid ((H, W)): map size.
        stride (float): pixels per cell.
        labeled (Tensor[B] bool, optional): False for images whose boxes are withheld.
        num_classes (int, optional): checks labels against ``0..C-1``.

    Returns:
        YOLOTargets: ``cls (B, A, H, W) int64``, ``box (B, A, 4, H, W)``, ``labeled (B,)``, ``dropped``.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if anchors.dim() != 2 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must be (A, 2), got {tuple(anchors.shape)}")
    gh, gw = grid
    boxes, labels = per_image_targets(boxes, labels, (gh * stride, gw * stride), num_classes)
    device = anchors.device
    b_count, a_count = len(boxes), len(anchors)
    is_labeled = _labeled_mask(labeled, b_count, device)
    cls = torch.full((b_count, a_count, gh, gw), -1, dtype=torch.int64, device=device)
    box = torch.zeros(b_count, a_count, 4, gh, gw, device=device)
    anchor_px = anchors.cpu() * stride
    dropped = 0
    for n, (b, lab) in enumerate(zip(boxes, labels)):
        if not bool(is_labeled[n]) or len(b) == 0:
            continue
        wh = b[:, 2:] - b[:, :2]
        centre = (b[:, :2] + b[:, 2:]) / 2
        inter = torch.minimum(wh[:, None], anchor_px[None]).prod(-1)
        shape_iou = inter / (wh.prod(-1)[:, None] + anchor_px.prod(-1)[None] - inter)
        best = shape_iou.argmax(1)  # first maximum: ties go to the lower anchor
        area = wh.prod(-1)
        order = sorted(range(len(b)), key=lambda k: (-float(area[k]), k))
        for k in order:
            j = min(int(centre[k, 0] // stride), gw - 1)
            i = min(int(centre[k, 1] // stride), gh - 1)
            a = int(best[k])
            if cls[n, a, i, j] >= 0:
                dropped += 1
                continue
            cls[n, a, i, j] = lab[k]
            box[n, a, :, i, j] = torch.stack([centre[k, 0] / stride - j, centre[k, 1] / stride - i,
                                              torch.log(wh[k, 0] / anchor_px[a, 0]),
                                              torch.log(wh[k, 1] / anchor_px[a, 1])]).to(device)
    return YOLOTargets(cls, box, is_labeled, dropped)


def decode_yolo_boxes(raw: torch.Tensor, anchors: torch.Tensor, stride: float) -> torch.Tensor:
    """Boxes ``(B, A, H, W, 4)`` as ``(x1, y1, x2, y2)`` pixels of a raw map ``(B, A, 5 + C, H, W)``."""
    _, _, _, h, w = raw.shape
    ii, jj = torch.meshgrid(torch.arange(h, device=raw.device, dtype=raw.dtype),
                            torch.arange(w, device=raw.device, dtype=raw.dtype), indexing="ij")
    cx = (jj + torch.sigmoid(raw[:, :, 0])) * stride
    cy = (ii + torch.sigmoid(raw[:, :, 1])) * stride
    a = anchors.to(raw.dtype)
    bw = a[:, 0, None, None] * torch.exp(raw[:, :, 2]) * stride
    bh = a[:, 1, None, None] * torch.exp(raw[:, :, 3]) * stride
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def encode_ssd_targets(boxes, labels, default_boxes: torch.Tensor, image_size: int, labeled=None,
                       num_classes: Optional[int] = None, iou_threshold: float = 0.5
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SSD matching and box encoding.

    A default box is positive for the ground-truth box it overlaps most if that IoU is
    at least ``iou_threshold``; besides, every ground-truth box claims its own best
    default box (boxes in order, a later box overriding an earlier one on the same
    default box), so no object goes unmatched.

    Args:
        boxes, labels: per-image ground truth (see :func:`per_image_targets`), pixels.
        default_boxes (Tensor[N, 4]): ``(cx, cy, w, h)`` pixels.
        image_size (int): side of the (square) image.
        labeled (Tensor[B] bool, optional): False for images whose boxes are withheld.

    Returns:
        ``(loc (B, N, 4), cls (B, N) int64)``: ``cls`` is ``label + 1`` at positives, ``0``
        (background) elsewhere, ``-1`` on every default box of an unlabeled image;
        ``loc`` holds ``((g_cx - d_cx) / (0.1 d_w), (g_cy - d_cy) / (0.1 d_h), log(g_w / d_w) / 0.2,
        log(g_h / d_h) / 0.2)`` at positives, zeros elsewhere.
    """
    boxes, labels = per_image_targets(boxes, labels, (image_size, image_size), num_classes)
    device = default_boxes.device
    n_def = len(default_boxes)
    is_labeled = _labeled_mask(labeled, len(boxes), device)
    loc = torch.zeros(len(boxes), n_def, 4, device=device)
    cls = torch.zeros(len(boxes), n_def, dtype=torch.int64, device=device)
    d_xyxy = _cxcywh_to_xyxy(default_boxes)
    v0, v1 = SSD_VARIANCES
    for n, (b, lab) in enumerate(zip(boxes, labels)):
        if not bool(is_labeled[n]):
            cls[n] = -1
            continue
        if len(b) == 0:
            continue
        b, lab = b.to(device), lab.to(device)
        iou = box_iou(b, d_xyxy)  # (M, N)
        best_iou, best_gt = iou.max(0)
        for m, d in enumerate(iou.argmax(1).tolist()):
            best_gt[d], best_iou[d] = m, 1.0
        pos = best_iou >= iou_threshold
        g = b[best_gt]
        g_c, g_wh = (g[:, :2] + g[:, 2:]) / 2, g[:, 2:] - g[:, :2]
        enc = torch.cat([(g_c - default_boxes[:, :2]) / (v0 * default_boxes[:, 2:]),
                         torch.log(g_wh / default_boxes[:, 2:]) / v1], 1)
        loc[n] = torch.where(pos[:, None], enc, torch.zeros_like(enc))
        cls[n] = torch.where(pos, lab[best_gt] + 1, torch.zeros_like(best_gt))
    return loc, cls


def decode_ssd_boxes(loc: torch.Tensor, default_boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` boxes ``(..., N, 4)`` of SSD box offsets ``loc (..., N, 4)``."""
    v0, v1 = SSD_VARIANCES
    d = default_boxes.to(loc.dtype)
    c = d[:, :2] + loc[..., :2] * v0 * d[:, 2:]
    wh = d[:, 2:] * torch.exp(loc[..., 2:] * v1)
    return _cxcywh_to_xyxy(torch.cat([c, wh], -1))
