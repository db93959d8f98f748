"""Single-shot detectors: YOLOv2-style (a teacher and two students) and SSD-style.

Every detector is one registered class (:func:`register_detector`), built by name
or import path with :func:`build_detector`, and offers the same four methods:

- ``forward(images)``: the raw output. YOLO-style: the map ``(B, A, 5 + C, H, W)``
  of docs/yolo_loss.md; SSD-style: ``(loc (B, N, 4), conf (B, N, C + 1))``.
- ``encode_targets(boxes, labels, labeled=None)``: ground truth in the form the
  detector's criterion takes after the raw output.
- ``criterion(**options)``: the training loss module (:class:`~pycompress.detection.YOLOLoss`
  or :class:`~pycompress.detection.SSDLoss`).
- ``postprocess(raw, score_threshold, iou_threshold, max_detections)``: per-image
  ``{"boxes", "scores", "labels"}`` after per-class NMS (``pycompress.functional.batched_nms``).

The forward of each detector is plain tensor code (no data-dependent Python
branch), so it traces with ``torch.fx``; the head convolutions stay in the graph,
and their views and concatenations are in ``forward`` itself.
"""

import importlib
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.detection.losses import SSDLoss, YOLOLoss
from pycompress.models.nets import conv_bn_relu
from pycompress.detection.targets import (decode_ssd_boxes, decode_yolo_boxes, encode_ssd_targets,
                                          encode_yolo_targets)

__all__ = ["DETECTORS", "register_detector", "build_detector", "detector_names", "YOLODetector", "YOLOTeacher",
           "TinyYOLO", "DeepNarrowYOLO", "SSDDetector", "DIGIT_ANCHORS", "select_detections"]

DETECTORS: Dict[str, Callable[..., nn.Module]] = {}

# (p_w, p_h) in cells of the stride-8 grid: tall boxes from 10 to 24 px, the spread of the
# digit-detection heights (8 to 28 px, log-uniform; widths about 0.7 of the height).
DIGIT_ANCHORS = ((0.9, 1.3), (1.4, 2.0), (2.1, 3.0))


def register_detector(name: str):
    """Class decorator: makes a detector buildable by ``name`` (:func:`build_detector`)."""
    def wrap(cls):
        if name in DETECTORS:
            raise ValueError(f"a detector named {name!r} is already registered")
        DETECTORS[name] = cls
        cls.registry_name = name
        return cls
    return wrap


def detector_names() -> List[str]:
    return sorted(DETECTORS)


def build_detector(name: str, **kwargs) -> nn.Module:
    """A registered detector by name (``"yolo_teacher"``), or any factory by import path (``"pkg.mod:fn"``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name in DETECTORS:
        return DETECTORS[name](**kwargs)
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(**kwargs)
    raise ValueError(f"name: unknown detector {name!r}; registered: {detector_names()}, or give 'module:factory'")


def _check_images(x: torch.Tensor, channels: int, image_size: int):
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing: shapes are checked by the traced run
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"images must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(f"images must be (B, {channels}, {image_size}, {image_size}), got {tuple(x.shape)}")


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, iou_threshold: float,
                      max_detections: int) -> Dict[str, torch.Tensor]:
    """One image's detections from every candidate box and its per-class scores.

    Args:
        boxes (Tensor[N, 4]): candidate boxes ``(x1, y1, x2, y2)``.
        scores (Tensor[N, C]): score of each candidate for each class.

    Returns:
        dict: ``boxes (K, 4)``, ``scores (K,)``, ``labels (K,) int64``, in descending score order,
        ``K <= max_detections``: every (candidate, class) pair above ``score_threshold``
        that survives NMS within its class.
    """
    from pycompress.functional import batched_nms

    cand, cls = torch.nonzero(scores > score_threshold, as_tuple=True)
    b, s = boxes[cand], scores[cand, cls]
    keep = batched_nms(b, s, cls, iou_threshold)[:max_detections]
    return {"boxes": b[keep], "scores": s[keep], "labels": cls[keep]}


def _check_postprocess_args(score_threshold, iou_threshold, max_detections):
    if not 0 <= score_threshold < 1:
        raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be an int >= 1, got {max_detections!r}")


def conv_bn_leaky(cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Darknet's unit: conv (no bias) -> BatchNorm -> LeakyReLU(0.1)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True))


# ------------------------------------------------------------------------------ YOLO
class YOLODetector(nn.Module):
    """Base of the YOLOv2-style detectors: one 1x1 head conv on a stride-``stride`` map.

    Subclasses build ``self.head_input(x) -> (B, c, H, W)`` and call :meth:`_make_head`.

    Args:
        num_classes (int): C.
        anchors (sequence of (p_w, p_h)): A anchor shapes in grid cells.
        image_size (int): input side in pixels; ``image_size / stride`` cells per side.
        in_channels (int): image channels.

    Shape:
        - images: ``(B, in_channels, image_size, image_size)``
        - output: ``(B, A, 5 + C, H, W)``, channel order of docs/yolo_loss.md
    """

    stride = 8

    def __init__(self, num_classes: int = 10, anchors: Sequence[Sequence[float]] = DIGIT_ANCHORS,
                 image_size: int = 64, in_channels: int = 3):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        anchors = torch.as_tensor(anchors, dtype=torch.float32)
        if anchors.dim() != 2 or anchors.shape[1] != 2 or len(anchors) == 0 or not bool((anchors > 0).all()):
            raise ValueError(f"anchors must be a non-empty (A, 2) list of positive (p_w, p_h), got {anchors.tolist()}")
        if image_size % self.stride:
            raise ValueError(f"image_size must be a multiple of the stride {self.stride}, got {image_size}")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.register_buffer("anchors", anchors)
        self.grid = (image_size // self.stride, image_size // self.stride)

    def _make_head(self, channels: int):
        self.head = nn.Conv2d(channels, len(self.anchors) * (5 + self.num_classes), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.in_channels, self.image_size)
        out = self.head(self.head_input(images))
        b, _, h, w = out.shape
        return out.view(b, len(self.anchors), 5 + self.num_classes, h, w)

    def encode_targets(self, boxes, labels, labeled=None) -> tuple:
        """``(cls, box, labeled)`` of :func:`~pycompress.detection.encode_yolo_targets` for this map."""
        t = encode_yolo_targets(boxes, labels, self.anchors, grid=self.grid, stride=self.stride, labeled=labeled,
                                num_classes=self.num_classes)
        return t.cls, t.box, t.labeled

    def criterion(self, **options) -> YOLOLoss:
        return YOLOLoss(self.anchors, **options)

    def decode(self, raw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(boxes (B, A*H*W, 4) pixels, scores (B, A*H*W, C) = o * p_c)`` of a raw map."""
        boxes = decode_yolo_boxes(raw, self.anchors, self.stride)  # (B, A, H, W, 4)
        obj = torch.sigmoid(raw[:, :, 4])
        probs = torch.softmax(raw[:, :, 5:], dim=2)
        scores = (obj.unsqueeze(2) * probs).permute(0, 1, 3, 4, 2)
        b = raw.shape[0]
        return boxes.reshape(b, -1, 4), scores.reshape(b, -1, self.num_classes)

    @torch.no_grad()
    def postprocess(self, raw: torch.Tensor, score_threshold: float = 0.01, iou_threshold: float = 0.5,
                    max_detections: int = 100) -> List[Dict[str, torch.Tensor]]:
        """Per-image detections: boxes clipped to the image, class score ``o * p_c``, per-class NMS."""
        _check_postprocess_args(score_threshold, iou_threshold, max_detections)
        if raw.dim() != 5 or raw.shape[1] != len(self.anchors) or raw.shape[2] != 5 + self.num_classes:
            raise ValueError(f"raw must be (B, {len(self.anchors)}, {5 + self.num_classes}, H, W), "
                             f"got {tuple(raw.shape)}")
        boxes, scores = self.decode(raw.float())
        boxes = boxes.clamp(0, self.image_size)
        return [select_detections(b, s, score_threshold, iou_threshold, max_detections)
                for b, s in zip(boxes, scores)]


@register_detector("yolo_teacher")
class YOLOTeacher(YOLODetector):
    """A YOLOv2-style teacher (a reduced Darknet-19): 3x3 convs with 1x1 bottlenecks and
    max-pools down to stride 8, and YOLOv2's passthrough: the stride-4 map, squeezed by a
    1x1 conv and rearranged by space-to-depth (``pixel_unshuffle``), concatenated before the last conv.

    Args:
        width (int): channels of the first conv; later stages use 2x, 4x, 8x.
        **kwargs: of :class:`YOLODetector`.
    """

    def __init__(self, width: int = 16, **kwargs):
        super().__init__(**kwargs)
        w = width
        self.stem = nn.Sequential(conv_bn_leaky(self.in_channels, w), nn.MaxPool2d(2),  # /2
                                  conv_bn_leaky(w, 2 * w), nn.MaxPool2d(2),  # /4
                                  conv_bn_leaky(2 * w, 4 * w), conv_bn_leaky(4 * w, 2 * w, 1),
                                  conv_bn_leaky(2 * w, 4 * w))  # the passthrough source, /4
        self.deep = nn.Sequential(nn.MaxPool2d(2),  # /8
                                  conv_bn_leaky(4 * w, 8 * w), conv_bn_leaky(8 * w, 4 * w, 1),
                                  conv_bn_leaky(4 * w, 8 * w), conv_bn_leaky(8 * w, 8 * w))
        self.passthrough = conv_bn_leaky(4 * w, w, 1)
        self.fuse = conv_bn_leaky(8 * w + 4 * w, 8 * w)
        self._make_head(8 * w)

    def head_input(self, x):
        route = self.stem(x)
        return self.fuse(torch.cat([self.deep(route), F.pixel_unshuffle(self.passthrough(route), 2)], 1))


@register_detector("tiny_yolo")
class TinyYOLO(YOLODetector):
    """A Tiny-YOLO-like student: a plain chain of 3x3 conv -> max-pool, then two 3x3 convs.

    Args:
        width (int): channels of the first conv (then 2x, 4x, 8x, 8x).
    """

    def __init__(self, width: int = 6, **kwargs):
        super().__init__(**kwargs)
        w = width
        self.features = nn.Sequential(conv_bn_leaky(self.in_channels, w), nn.MaxPool2d(2),
                                      conv_bn_leaky(w, 2 * w), nn.MaxPool2d(2),
                                      conv_bn_leaky(2 * w, 4 * w), nn.MaxPool2d(2),
                                      conv_bn_leaky(4 * w, 8 * w), conv_bn_leaky(8 * w, 8 * w))
        self._make_head(8 * w)

    def head_input(self, x):
        return self.features(x)


@register_detector("deep_narrow_yolo")
class DeepNarrowYOLO(YOLODetector):
    """Mehta & Ozturk's deep-and-narrow student: more, narrower layers with 1x1 bottlenecks,
    and feature-map stacking (a space-to-depth passthrough of the stride-4 map, concatenated
    with the stride-8 map and mixed by a 1x1 conv).

    Args:
        width (int): channels of the first conv.
    """

    def __init__(self, width: int = 5, **kwargs):
        super().__init__(**kwargs)
        w = width
        self.stem = nn.Sequential(conv_bn_leaky(self.in_channels, w), nn.MaxPool2d(2),
                                  conv_bn_leaky(w, 2 * w), nn.MaxPool2d(2),
                                  conv_bn_leaky(2 * w, 4 * w), conv_bn_leaky(4 * w, 2 * w, 1),
                                  conv_bn_leaky(2 * w, 4 * w))
        self.deep = nn.Sequential(nn.MaxPool2d(2),
                                  conv_bn_leaky(4 * w, 8 * w), conv_bn_leaky(8 * w, 4 * w, 1),
                                  conv_bn_leaky(4 * w, 8 * w), conv_bn_leaky(8 * w, 4 * w, 1),
                                  conv_bn_leaky(4 * w, 8 * w))
        self.passthrough = conv_bn_leaky(4 * w, w, 1)
        self.stack = conv_bn_leaky(8 * w + 4 * w, 8 * w, 1)
        self.last = conv_bn_leaky(8 * w, 8 * w)
        self._make_head(8 * w)

    def head_input(self, x):
        route = self.stem(x)
        stacked = torch.cat([self.deep(route), F.pixel_unshuffle(self.passthrough(route), 2)], 1)
        return self.last(self.stack(stacked))


# ------------------------------------------------------------------------------ SSD
def ssd_default_boxes(image_size: int, strides: Sequence[int], scales: Sequence[float],
                      aspect_ratios: Sequence[float]) -> torch.Tensor:
    """SSD's default boxes ``(N, 4)`` as ``(cx, cy, w, h)`` pixels, map by map, cell by cell (row-major),
    and per cell the ``aspect_ratios`` (w / h) at scale ``s_k`` then one extra square box at
    ``sqrt(s_k s_{k+1})`` (the order the heads' channels follow)."""
    out = []
    for k, stride in enumerate(strides):
        n = image_size // stride
        s = scales[k] * image_size
        s_next = math.sqrt(scales[k] * (scales[k + 1] if k + 1 < len(scales) else 1.0)) * image_size
        shapes = [(s * math.sqrt(r), s / math.sqrt(r)) for r in aspect_ratios] + [(s_next, s_next)]
        for i in range(n):
            for j in range(n):
                cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
                out += [(cx, cy, w, h) for w, h in shapes]
    return torch.tensor(out, dtype=torch.float32)


@register_detector("ssd")
class SSDDetector(nn.Module):
    """An SSD-style detector: a VGG-like backbone (pairs of 3x3 convs, max-pools) to stride 8,
    extra layers (1x1 squeeze, 3x3 stride-2) to strides 16 and 32, and a 3x3 box head and
    class head on each of those three maps, over default boxes.

    Args:
        num_classes (int): C (class 0 of ``conf`` is the background, so it has C + 1 logits).
        width (int): channels of the first stage (then 2x, 4x, 8x).
        image_size (int): input side in pixels.
        in_channels (int): image channels.
        scales (sequence of float): default-box scale of each map, as a fraction of the image.
        aspect_ratios (sequence of float): default-box ``w / h`` at each scale (tall: digits are).

    Shape:
        - images: ``(B, in_channels, image_size, image_size)``
        - output: ``(loc (B, N, 4), conf (B, N, C + 1))``, N default boxes.
    """

    strides = (8, 16, 32)

    def __init__(self, num_classes: int = 10, width: int = 16, image_size: int = 64, in_channels: int = 3,
                 scales: Sequence[float] = (0.16, 0.32, 0.56), aspect_ratios: Sequence[float] = (1.0, 0.7, 0.5)):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if image_size % self.strides[-1]:
            raise ValueError(f"image_size must be a multiple of {self.strides[-1]}, got {image_size}")
        if len(scales) != len(self.strides):
            raise ValueError(f"scales must give one scale per map ({len(self.strides)}), got {list(scales)}")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        w = width

        def stage(cin, cout, pool=True):
            return [conv_bn_relu(cin, cout), conv_bn_relu(cout, cout)] + ([nn.MaxPool2d(2)] if pool else [])

        self.backbone = nn.Sequential(*stage(in_channels, w), *stage(w, 2 * w), *stage(2 * w, 4 * w),
                                      *stage(4 * w, 8 * w, pool=False))
        self.extras = nn.ModuleList([nn.Sequential(conv_bn_relu(8 * w, 4 * w, 1), conv_bn_relu(4 * w, 8 * w, 3, 2))
                                     for _ in self.strides[1:]])
        self.boxes_per_cell = len(aspect_ratios) + 1
        k = self.boxes_per_cell
        self.loc_heads = nn.ModuleList([nn.Conv2d(8 * w, k * 4, 3, padding=1) for _ in self.strides])
        self.conf_heads = nn.ModuleList([nn.Conv2d(8 * w, k * (num_classes + 1), 3, padding=1)
                                         for _ in self.strides])
        self.register_buffer("default_boxes", ssd_default_boxes(image_size, self.strides, scales, aspect_ratios))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_images(images, self.in_channels, self.image_size)
        x = self.backbone(images)
        sources = [x]
        for extra in self.extras:
            x = extra(x)
            sources.append(x)
        b = images.shape[0]
        loc = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1, 4) for h, s in zip(self.loc_heads, sources)], 1)
        conf = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1)
                          for h, s in zip(self.conf_heads, sources)], 1)
        return loc, conf

    def encode_targets(self, boxes, labels, labeled=None) -> tuple:
        """``(loc_targets (B, N, 4), cls_targets (B, N))`` of :func:`~pycompress.detection.encode_ssd_targets`."""
        return encode_ssd_targets(boxes, labels, self.default_boxes, image_size=self.image_size, labeled=labeled,
                                  num_classes=self.num_classes)

    def criterion(self, **options) -> SSDLoss:
        return SSDLoss(**options)

    @torch.no_grad()
    def postprocess(self, raw, score_threshold: float = 0.01, iou_threshold: float = 0.5,
                    max_detections: int = 100) -> List[Dict[str, torch.Tensor]]:
        """Per-image detections: softmax class scores (background dropped), decoded boxes clipped
        to the image, per-class NMS."""
        _check_postprocess_args(score_threshold, iou_threshold, max_detections)
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            raise TypeError("raw must be the (loc, conf) pair that forward returns")
        loc, conf = raw
        n = len(self.default_boxes)
        if loc.shape[1:] != (n, 4) or conf.shape[1:] != (n, self.num_classes + 1):
            raise ValueError(f"raw must be (loc (B, {n}, 4), conf (B, {n}, {self.num_classes + 1})), got "
                             f"{tuple(loc.shape)} and {tuple(conf.shape)}")
        boxes = decode_ssd_boxes(loc.float(), self.default_boxes).clamp(0, self.image_size)
        scores = torch.softmax(conf.float(), dim=-1)[..., 1:]
        return [select_detections(b, s, score_threshold, iou_threshold, max_detections)
                for b, s in zip(boxes, scores)]

