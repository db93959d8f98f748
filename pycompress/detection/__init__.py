"""Detection: target encoding, the YOLO and SSD losses, COCO evaluation and the training workflow.

The detectors themselves live in :mod:`pycompress.models.detection`; the data in
:mod:`pycompress.data.detection`.
"""

from pycompress.detection.evaluate import coco_map, evaluate
from pycompress.detection.losses import SSDLoss, YOLOLoss, ssd_loss, yolo_loss
from pycompress.detection.targets import (YOLOTargets, box_iou, decode_ssd_boxes, decode_yolo_boxes,
                                          encode_ssd_targets, encode_yolo_targets, per_image_targets)

__all__ = ["evaluate", "coco_map", "YOLOLoss", "SSDLoss", "yolo_loss", "ssd_loss", "YOLOTargets",
           "encode_yolo_targets", "decode_yolo_boxes", "encode_ssd_targets", "decode_ssd_boxes", "box_iou",
           "per_image_targets"]
