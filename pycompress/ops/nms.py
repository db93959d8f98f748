"""Detector ops: greedy NMS, per-category batched NMS and FM-NMS.

``pycompress::nms`` and ``pycompress::batched_nms`` return exactly what
``torchvision.ops.nms`` / ``batched_nms`` return (same indices, same order).
Backends: C++ on CPU (csrc/cpu/nms_kernel.cpp), CUDA C++ (csrc/cuda/nms_kernel.cu)
for nms and batched_nms; ``pycompress::fm_nms`` runs on C++ on CPU and on Triton
(kernels/nms.py) on CUDA. The ops return indices and masks, so they have no
gradient; this module adds input validation and the fake kernels.
"""

import numbers

import torch

from pycompress import _extension  # noqa: F401  (the schemas must exist before registering on them)

__all__ = ["nms", "batched_nms", "fm_nms", "apply_fm_nms"]


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} should be a Tensor, got {type(x).__name__}")


def _check_boxes(boxes, scores):
    _check_tensor("boxes", boxes)
    _check_tensor("scores", scores)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes should have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores should have shape ({boxes.shape[0]},) to match boxes, got {tuple(scores.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes should be a floating-point tensor, got {boxes.dtype}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"scores ({scores.dtype}) should have the dtype of boxes ({boxes.dtype})")
    if scores.device != boxes.device:
        raise ValueError(f"scores ({scores.device}) should be on the device of boxes ({boxes.device})")


def _check_threshold(iou_threshold):
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise TypeError(f"iou_threshold should be a real number, got {type(iou_threshold).__name__}")
    return float(iou_threshold)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, exactly as ``torchvision.ops.nms``.

    Boxes are visited in descending score order (a stable sort: equal scores go
    to the lower index). Each box not yet suppressed is kept and suppresses every
    later box whose IoU with it is strictly greater than ``iou_threshold``.

    .. math::
        \\mathrm{IoU}(i, j) = \\frac{|i \\cap j|}{\\mathrm{area}_i + \\mathrm{area}_j - |i \\cap j|}

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes. Zero-area and inverted
            boxes are taken as they are, with torchvision's arithmetic.
        scores (Tensor[N]): one score per box, same dtype as ``boxes``.
        iou_threshold (float): suppress when IoU > this value.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, in descending score order.

    Float32 and float64 are computed in their own precision, float16 and
    bfloat16 in float32.

    Example:
        >>> keep = nms(boxes, scores, 0.5)
    """
    _check_boxes(boxes, scores)
    return torch.ops.pycompress.nms(boxes, scores, _check_threshold(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS run independently per category, as ``torchvision.ops.batched_nms``.

    Boxes of different categories never suppress each other. Each category is
    processed on its own (no coordinate offsets, so very large coordinates stay
    exact), and the kept indices of all categories are returned in descending
    score order, equal scores by lower index.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): one score per box, same dtype as ``boxes``.
        idxs (Tensor[N]): integer category of each box (any values).
        iou_threshold (float): suppress when IoU > this value.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, in descending score order.

    Example:
        >>> keep = batched_nms(boxes, scores, labels, 0.5)
    """
    _check_boxes(boxes, scores)
    _check_tensor("idxs", idxs)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs should have shape ({boxes.shape[0]},) to match boxes, got {tuple(idxs.shape)}")
    if idxs.is_floating_point() or idxs.is_complex():
        raise TypeError(f"idxs should be an integer tensor, got {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"idxs ({idxs.device}) should be on the device of boxes ({boxes.device})")
    return torch.ops.pycompress.batched_nms(boxes, scores, idxs, _check_threshold(iou_threshold))


def _check_fm_nms(objectness, class_probs, kernel_size, suppress_objectness, validate):
    _check_tensor("objectness", objectness)
    _check_tensor("class_probs", class_probs)
    if objectness.dim() != 4:
        raise ValueError(f"objectness should have shape (B, A, H, W), got {tuple(objectness.shape)}")
    if class_probs.dim() != 5:
        raise ValueError(f"class_probs should have shape (B, A, C, H, W), got {tuple(class_probs.shape)}")
    b, a, c, h, w = class_probs.shape
    if (b, a, h, w) != tuple(objectness.shape) or c < 1:
        raise ValueError(f"class_probs {tuple(class_probs.shape)} should be (B, A, C, H, W) with C >= 1 for "
                         f"objectness (B, A, H, W) = {tuple(objectness.shape)}")
    if not objectness.is_floating_point():
        raise TypeError(f"objectness should be a floating-point tensor, got {objectness.dtype}")
    if not class_probs.is_floating_point():
        raise TypeError(f"class_probs should be a floating-point tensor, got {class_probs.dtype}")
    if class_probs.device != objectness.device:
        raise ValueError(f"class_probs ({class_probs.device}) should be on the device of objectness "
                         f"({objectness.device})")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise TypeError(f"kernel_size should be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size should be a positive odd integer, got {kernel_size}")
    if not isinstance(suppress_objectness, bool):
        raise TypeError(f"suppress_objectness should be a bool, got {type(suppress_objectness).__name__}")
    if validate:
        for name, x in (("objectness", objectness), ("class_probs", class_probs)):
            if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
                raise ValueError(f"{name} should hold probabilities in [0, 1] (after sigmoid/softmax); found "
                                 f"values in [{x.min().item()}, {x.max().item()}] or NaN")


def fm_nms(objectness: torch.Tensor, class_probs: torch.Tensor, kernel_size: int = 3,
           suppress_objectness: bool = False, *, validate: bool = False) -> torch.Tensor:
    """Feature-map NMS (Mehta & Ozturk 2018) on a YOLO teacher's last map: the keep mask.

    Per image, candidates (anchor ``a`` at cell ``h, w``) are visited by objectness,
    descending, ties to the lower flat index ``a*H*W + h*W + w``. A candidate not
    yet suppressed is kept and suppresses every candidate of the same argmax class
    whose cell is within the ``kernel_size x kernel_size`` window around its cell,
    other anchors of the same cell included.

    Args:
        objectness (Tensor[B, A, H, W]): teacher objectness after sigmoid.
        class_probs (Tensor[B, A, C, H, W]): teacher class probabilities.
        kernel_size (int): odd window size K (the paper uses 3).
        suppress_objectness (bool): accepted for signature parity with
            :func:`apply_fm_nms`; the mask is the same either way.
        validate (bool): check that both inputs lie in [0, 1] (costs a pass).

    Returns:
        Tensor[B, A, H, W] (bool): True for kept candidates.
    """
    _check_fm_nms(objectness, class_probs, kernel_size, suppress_objectness, validate)
    return torch.ops.pycompress.fm_nms(objectness, class_probs, int(kernel_size))


def apply_fm_nms(objectness: torch.Tensor, class_probs: torch.Tensor, kernel_size: int = 3,
                 suppress_objectness: bool = False, *, validate: bool = False):
    """FM-NMS applied to the teacher's map: suppressed candidates' class probabilities zeroed.

    Args: as :func:`fm_nms`; with ``suppress_objectness=True`` the objectness of
    suppressed candidates is zeroed too (a common reading; the paper zeroes only
    the class activations).

    Returns:
        (Tensor[B, A, H, W], Tensor[B, A, C, H, W]): ``(objectness, class_probs)``.
        The objectness is the input tensor itself when ``suppress_objectness`` is False.

    Example:
        >>> obj_t, cls_t = apply_fm_nms(teacher_obj, teacher_cls)  # then the distillation loss
    """
    keep = fm_nms(objectness, class_probs, kernel_size, suppress_objectness, validate=validate)
    class_probs = class_probs * keep.unsqueeze(2).to(class_probs.dtype)
    if suppress_objectness:
        objectness = objectness * keep.to(objectness.dtype)
    return objectness, class_probs


def _dynamic_indices(boxes):
    # The number of kept boxes depends on the data.
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


@torch.library.register_fake("pycompress::nms")
def _nms_fake(boxes, scores, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4,
                 lambda: f"pycompress::nms: boxes should have shape (N, 4), got {tuple(boxes.shape)}")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: f"pycompress::nms: scores should have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    torch._check(scores.dtype == boxes.dtype,
                 lambda: f"pycompress::nms: boxes ({boxes.dtype}) and scores ({scores.dtype}) should share a dtype")
    return _dynamic_indices(boxes)


@torch.library.register_fake("pycompress::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4,
                 lambda: f"pycompress::batched_nms: boxes should have shape (N, 4), got {tuple(boxes.shape)}")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: f"pycompress::batched_nms: scores should have shape ({boxes.shape[0]},), "
                         f"got {tuple(scores.shape)}")
    torch._check(idxs.dim() == 1 and idxs.shape[0] == boxes.shape[0],
                 lambda: f"pycompress::batched_nms: idxs should have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    torch._check(scores.dtype == boxes.dtype,
                 lambda: f"pycompress::batched_nms: boxes ({boxes.dtype}) and scores ({scores.dtype}) should share "
                         "a dtype")
    return _dynamic_indices(boxes)


@torch.library.register_fake("pycompress::fm_nms")
def _fm_nms_fake(objectness, class_probs, kernel_size):
    torch._check(objectness.dim() == 4, lambda: "pycompress::fm_nms: objectness should be (B, A, H, W)")
    torch._check(class_probs.dim() == 5, lambda: "pycompress::fm_nms: class_probs should be (B, A, C, H, W)")
    torch._check(tuple(class_probs.shape[:2]) + tuple(class_probs.shape[3:]) == tuple(objectness.shape),
                 lambda: f"pycompress::fm_nms: class_probs {tuple(class_probs.shape)} does not match objectness "
                         f"{tuple(objectness.shape)}")
    torch._check(kernel_size >= 1 and kernel_size % 2 == 1,
                 lambda: f"pycompress::fm_nms: kernel_size should be a positive odd integer, got {kernel_size}")
    return objectness.new_empty(objectness.shape, dtype=torch.bool)


@torch.library.register_kernel("pycompress::fm_nms", "cuda")
def _fm_nms_cuda(objectness, class_probs, kernel_size):
    # Triton is imported on first GPU use only: CPU users never pay for it.
    from pycompress.kernels.nms import fm_nms_triton

    return fm_nms_triton(objectness, class_probs, kernel_size)
