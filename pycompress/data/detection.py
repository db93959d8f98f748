"""Digit detection: generated canvases of several handwritten digits, with boxes.

Every canvas is drawn from scikit-learn's bundled 8x8 digits, deterministically
from a seed, in seconds (no download). A canvas holds 1 to ``max_objects``
digits at heights from ``min_size`` to ``max_size`` pixels (log-uniform: as many
small as large objects), placed with limited overlap, on a coloured background
with a gradient, line and digit-fragment clutter and pixel noise.

The 1797 source digits are partitioned (stratified by class) into four disjoint
pools, one per split: ``train``, ``val``, ``test`` and ``unlabeled`` (whose boxes
are withheld, for distillation on unlabeled data). A split's canvases, digits and
fragments alike, draw only from its own pool, so the test set holds handwriting
no model has seen. See docs/detection.md for why the sizes are what they are.

A split is a :class:`DetectionDataset`: a ``TensorDataset`` of
``(image, boxes, labels, labeled)`` items with the targets padded to
``max_objects`` (label ``-1`` marks padding), so the shared Trainer batches it
with one gather per tensor.
"""

import functools
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pycompress.data.digits import load_digits_tensors

__all__ = ["DetectionDataset", "DigitDetectionSplits", "digit_detection", "digit_detection_splits", "to_coco",
           "unpad_targets", "SPLITS"]

SPLITS = ("train", "val", "test", "unlabeled")
# share of the source digits in each split's pool, and the default number of canvases per split
_POOL_FRACTIONS = {"train": 0.5, "val": 0.1, "test": 0.2, "unlabeled": 0.2}
_DEFAULT_IMAGES = {"train": 6000, "val": 500, "test": 1000, "unlabeled": 4000}
_MAX_OVERLAP = 0.2  # intersection over the smaller box's area allowed between two digits
_PLACEMENT_TRIES = 30


class DetectionDataset(TensorDataset):
    """Images and padded box targets; items are ``(image, boxes, labels, labeled)``.

    Shape:
        - images: ``(N, 3, S, S)`` float32 in [0, 1]
        - boxes: ``(N, M, 4)`` float32 ``(x1, y1, x2, y2)`` pixels (zeros at padding)
        - labels: ``(N, M)`` int64 in ``0..num_classes-1``, ``-1`` at padding
        - labeled: ``(N,)`` bool, False when the boxes are withheld (the unlabeled pool)

    Attributes:
        num_classes (int): 10.
        image_size (int): canvas side S in pixels.
        source_digits (np.ndarray): sorted indices of the source digits this split drew from.
    """

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor,
                 num_classes: int = 10, source_digits: np.ndarray = None):
        if images.dim() != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (N, C, S, S), got {tuple(images.shape)}")
        if boxes.shape[:2] != labels.shape or boxes.shape[-1] != 4 or labeled.shape != labels.shape[:1]:
            raise ValueError(f"boxes (N, M, 4), labels (N, M) and labeled (N,) disagree: {tuple(boxes.shape)}, "
                             f"{tuple(labels.shape)}, {tuple(labeled.shape)}")
        super().__init__(images, boxes, labels, labeled)
        self.num_classes = num_classes
        self.image_size = images.shape[-1]
        self.source_digits = source_digits if source_digits is not None else np.zeros(0, dtype=np.int64)

    def targets(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unpadded ``(boxes (M_i, 4), labels (M_i,))`` of one image."""
        keep = self.tensors[2][index] >= 0
        return self.tensors[1][index][keep], self.tensors[2][index][keep]


class DigitDetectionSplits(NamedTuple):
    train: DetectionDataset
    val: DetectionDataset
    test: DetectionDataset
    unlabeled: DetectionDataset


def unpad_targets(boxes: torch.Tensor, labels: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Padded ``(B, M, 4)`` boxes and ``(B, M)`` labels (``-1`` = padding) -> per-image lists."""
    keep = labels >= 0
    return [b[k] for b, k in zip(boxes, keep)], [lab[k] for lab, k in zip(labels, keep)]


def _source_pools(seed: int) -> Dict[str, np.ndarray]:
    """Disjoint, class-stratified pools of source-digit indices, one per split."""
    _, labels = load_digits_tensors()
    labels = labels.numpy()
    rng = np.random.default_rng([seed, 7919])  # a stream of its own: pools do not depend on canvas sizes
    pools = {s: [] for s in SPLITS}
    bounds = np.cumsum([_POOL_FRACTIONS[s] for s in SPLITS])
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        for s, lo, hi in zip(SPLITS, np.r_[0, cuts[:-1]], cuts):
            pools[s].append(idx[lo:hi])
    return {s: np.sort(np.concatenate(v)) for s, v in pools.items()}


@functools.lru_cache(maxsize=None)
def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out, in)`` weights of 1-D bilinear resampling (half-pixel centres, as ``F.interpolate``)."""
    eye = torch.eye(in_size)[:, None]  # one basis signal per input pixel
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[:, 0].T.numpy().copy()


def _resize(glyph: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize as two small matrix products (separable), far cheaper than a call per glyph."""
    return _interpolation_matrix(h, glyph.shape[0]) @ glyph @ _interpolation_matrix(w, glyph.shape[1]).T


def _paste(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray, x: int, y: int):
    """Alpha-blends ``color`` into ``canvas (3, S, S)`` where ``alpha (h, w)`` says, clipped to the canvas."""
    s = canvas.shape[1]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, s), min(y + h, s)
    if x0 >= x1 or y0 >= y1:
        return
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x][None]
    region = canvas[:, y0:y1, x0:x1]
    canvas[:, y0:y1, x0:x1] = region * (1 - a) + color[:, None, None] * a


def _overlap_too_large(box: np.ndarray, placed: List[np.ndarray]) -> bool:
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            if iw * ih > _MAX_OVERLAP * smaller:
                return True
    return False


@functools.lru_cache(maxsize=None)
def _unit_grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32) / size


def _ink_crops(glyphs: np.ndarray) -> List[np.ndarray]:
    """Each digit cropped to its inked rows and columns, so that its box is tight."""
    out = []
    for g in glyphs:
        rows, cols = np.flatnonzero(g.max(1) > 0), np.flatnonzero(g.max(0) > 0)
        out.append(np.ascontiguousarray(g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    return out


def _draw_canvas(rng: np.random.Generator, glyphs: np.ndarray, inks: List[np.ndarray], glyph_labels: np.ndarray,
                 pool: np.ndarray, size: int, max_objects: int, min_size: int, max_size: int):
    """One canvas: ``(image (3, S, S), boxes (k, 4), labels (k,), digits used)``."""
    yy, xx = _unit_grid(size)
    base = rng.uniform(0.0, 0.35, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[None] * rng.uniform(0, 0.15, size=(3, 1, 1))
    canvas = (base[:, None, None] + ramp).astype(np.float32)
    used = []
    for _ in range(rng.integers(2, 7)):  # clutter: thin lines and fragments of digits, never labelled
        color = rng.uniform(0.3, 0.9, size=3).astype(np.float32)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, size, size=4)
            t = np.linspace(0, 1, 2 * size)
            xs = np.clip(np.round(x0 + t * (x1 - x0)).astype(int), 0, size - 1)
            ys = np.clip(np.round(y0 + t * (y1 - y0)).astype(int), 0, size - 1)
            a = rng.uniform(0.4, 0.8)
            canvas[:, ys, xs] = canvas[:, ys, xs] * (1 - a) + color[:, None] * a
        else:
            d = int(pool[rng.integers(len(pool))])
            used.append(d)
            r, c = rng.integers(0, 5, size=2)
            piece = glyphs[d][r:r + 4, c:c + 4]
            scale = int(rng.integers(2, 5))
            alpha = _resize(piece, 4 * scale, 4 * scale)
            _paste(canvas, alpha, color, int(rng.integers(-4, size)), int(rng.integers(-4, size)))
    boxes, labels = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        d = int(pool[rng.integers(len(pool))])
        ink = inks[d]
        h = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max_size)))))
        w = max(3, int(round(h * ink.shape[1] / ink.shape[0])))
        for _ in range(_PLACEMENT_TRIES):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            if not _overlap_too_large(box, boxes):
                break
        else:
            continue  # no room left for this one: the canvas gets fewer digits
        color = rng.uniform(0.55, 1.0, size=3).astype(np.float32)
        _paste(canvas, _resize(ink, h, w), color, x, y)
        boxes.append(box)
        labels.append(int(glyph_labels[d]))
        used.append(d)
    canvas += rng.uniform(0.02, 0.08) * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    np.clip(canvas, 0, 1, out=canvas)
    return canvas, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64), used


def digit_detection(split: str = "train", num_images: int = None, *, image_size: int = 64, max_objects: int = 8,
                    min_size: int = 8, max_size: int = 28, seed: int = 0) -> DetectionDataset:
    """One split of the digit-detection benchmark.

    Args:
        split (str): ``"train"``, ``"val"``, ``"test"`` or ``"unlabeled"`` (boxes withheld).
        num_images (int, optional): canvases to draw; default 6000 / 500 / 1000 / 4000.
        image_size (int): canvas side in pixels (the detectors' stride-8 grid is ``image_size / 8``).
        max_objects (int): at most this many digits per canvas (at least 1).
        min_size, max_size (int): digit heights are log-uniform in this range, in pixels.
        seed (int): fixes the source-digit pools and every canvas.

    Returns:
        DetectionDataset: items ``(image (3, S, S), boxes (M, 4), labels (M,), labeled ())``,
        ``M = max_objects``.

    Example:
        >>> test = digit_detection("test", 100)
        >>> image, boxes, labels, labeled = test[0]
        >>> boxes[labels >= 0]          # the digits of canvas 0, (x1, y1, x2, y2) pixels
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    num_images = _DEFAULT_IMAGES[split] if num_images is None else num_images
    for name, v in (("num_images", num_images), ("image_size", image_size), ("max_objects", max_objects),
                    ("min_size", min_size), ("max_size", max_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not 3 <= min_size <= max_size <= image_size:
        raise ValueError(f"need 3 <= min_size ({min_size}) <= max_size ({max_size}) <= image_size ({image_size})")
    images, labels = load_digits_tensors()
    glyphs, glyph_labels = images[:, 0].numpy(), labels.numpy()
    inks = _ink_crops(glyphs)
    pool = _source_pools(seed)[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out_images = np.empty((num_images, 3, image_size, image_size), dtype=np.float32)
    out_boxes = np.zeros((num_images, max_objects, 4), dtype=np.float32)
    out_labels = np.full((num_images, max_objects), -1, dtype=np.int64)
    used = set()
    for i in range(num_images):
        canvas, b, lab, digits = _draw_canvas(rng, glyphs, inks, glyph_labels, pool, image_size, max_objects, min_size,
                                              max_size)
        out_images[i] = canvas
        out_boxes[i, :len(b)] = b
        out_labels[i, :len(lab)] = lab
        used.update(digits)
    labeled = split != "unlabeled"
    if not labeled:  # the boxes are withheld
        out_boxes[:] = 0
        out_labels[:] = -1
    return DetectionDataset(torch.from_numpy(out_images), torch.from_numpy(out_boxes), torch.from_numpy(out_labels),
                            torch.full((num_images,), labeled), num_classes=10,
                            source_digits=np.array(sorted(used), dtype=np.int64))


def digit_detection_splits(seed: int = 0, num_images: Dict[str, int] = None, **kwargs) -> DigitDetectionSplits:
    """All four splits (``train``, ``val``, ``test``, ``unlabeled``) of :func:`digit_detection`.

    Args:
        seed (int): as in :func:`digit_detection`.
        num_images (dict, optional): canvases per split name; missing splits keep their default.
        **kwargs: ``image_size``, ``max_objects``, ``min_size``, ``max_size``.
    """
    num_images = dict(num_images or {})
    unknown = set(num_images) - set(SPLITS)
    if unknown:
        raise ValueError(f"num_images: unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    return DigitDetectionSplits(*(digit_detection(s, num_images.get(s), seed=seed, **kwargs) for s in SPLITS))


def to_coco(dataset: DetectionDataset) -> dict:
    """COCO-format ground truth of a labeled split: ``{"images", "annotations", "categories"}``.

    Image ids are dataset indices, category ids are the digit labels 0-9, ``bbox`` is
    ``[x, y, w, h]`` in pixels. Unlabeled images are listed with no annotation.
    """
    if not isinstance(dataset, DetectionDataset):
        raise TypeError(f"dataset must be a DetectionDataset, got {type(dataset).__name__}")
    images, boxes, labels, _ = dataset.tensors
    s = dataset.image_size
    coco = {"images": [{"id": i, "width": s, "height": s, "file_name": f"{i:06d}.png"} for i in range(len(images))],
            "annotations": [],
            "categories": [{"id": c, "name": str(c)} for c in range(dataset.num_classes)]}
    for i, (b, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        for (x1, y1, x2, y2), c in zip(b, lab):
            if c >= 0:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": c,
                                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                            "iscrowd": 0})
    return coco
