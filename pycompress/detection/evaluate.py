"""COCO mAP of a detector through pycocotools' COCOeval (the maintained reference evaluator)."""

import contextlib
import io
from typing import Dict

import torch

__all__ = ["evaluate", "coco_map"]


def coco_map(ground_truth: dict, detections: list) -> Dict[str, object]:
    """COCO AP@[.5:.95], AP50, AP75 and per-class AP50 of ``detections`` against ``ground_truth``.

    Args:
        ground_truth (dict): COCO format (``images``, ``annotations``, ``categories``).
        detections (list of dict): ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    Returns:
        dict: ``AP``, ``AP50``, ``AP75`` (floats in [0, 1]) and ``per_class_AP50``
        (category id as str -> AP50, None for a category without ground truth).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = [c["id"] for c in ground_truth["categories"]]
    if not detections:  # COCO.loadRes refuses an empty list: nothing detected scores zero
        present = {a["category_id"] for a in ground_truth["annotations"]}
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0,
                "per_class_AP50": {str(c): (0.0 if c in present else None) for c in cat_ids}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: (iou thresholds, recall points, categories, area ranges, max dets); IoU .5, all areas, 100 dets
    precision = ev.eval["precision"][0, :, :, 0, -1]
    per_class = {}
    for k, c in enumerate(ev.params.catIds):
        p = precision[:, k]
        per_class[str(c)] = float(p[p > -1].mean()) if (p > -1).any() else None
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1 means "no ground truth": report 0
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], "per_class_AP50": per_class}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 64, score_threshold: float = 0.01,
             iou_threshold: float = 0.5, max_detections: int = 100, num_classes: int = None) -> Dict[str, object]:
    """COCO mAP of a detector on a labeled detection dataset.

    Args:
        model (nn.Module): a detector with ``postprocess`` (see :mod:`pycompress.models.detection`);
            run in eval mode on its own device, its mode restored afterwards.
        dataset: items ``(image (3, S, S), boxes (M, 4), labels (M,), ...)`` with ``-1`` labels
            marking padding (:class:`pycompress.data.DetectionDataset`).
        batch_size (int): images per forward.
        score_threshold, iou_threshold, max_detections: of ``model.postprocess``.
        num_classes (int, optional): categories 0..C-1; default ``model.num_classes``.

    Returns:
        dict: as :func:`coco_map`, plus ``images`` (count) and ``detections`` (count).

    Example:
        >>> evaluate(teacher, digit_detection("test"))["AP50"]
    """
    if not hasattr(model, "postprocess"):
        raise TypeError(f"model must be a detector with postprocess(), got {type(model).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    from pycompress.train import collate

    num_classes = num_classes or model.num_classes
    device = next(model.parameters()).device
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in range(num_classes)]}
    detections = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            idx = list(range(start, min(start + batch_size, len(dataset))))
            batch = collate(dataset, idx)
            images, boxes, labels = batch[0], batch[1], batch[2]
            if len(batch) > 3 and not bool(torch.as_tensor(batch[3]).all()):
                raise ValueError("dataset: evaluation needs labeled images (the unlabeled pool has no boxes)")
            results = model.postprocess(model(images.to(device)), score_threshold, iou_threshold, max_detections)
            for i, b, lab, det in zip(idx, boxes.tolist(), labels.tolist(), results):
                gt["images"].append({"id": i, "height": images.shape[-2], "width": images.shape[-1]})
                for (x1, y1, x2, y2), c in zip(b, lab):
                    if c >= 0:
                        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i,
                                                  "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                                  "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                for (x1, y1, x2, y2), s, c in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                  det["labels"].tolist()):
                    detections.append({"image_id": i, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                       "score": s})
    finally:
        model.train(was_training)
    return {**coco_map(gt, detections), "images": len(dataset), "detections": len(detections)}
