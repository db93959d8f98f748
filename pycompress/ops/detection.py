"""Detector ops (the nms family): fake kernels and the Triton FM-NMS backend.

``pycompress::nms`` and ``pycompress::batched_nms`` return exactly what
``torchvision.ops.nms`` / ``batched_nms`` return (same indices, same order).
Backends: C++ on CPU (csrc/cpu/nms_kernel.cpp), CUDA C++ (csrc/cuda/nms_kernel.cu)
for nms and batched_nms; ``pycompress::fm_nms`` runs on C++ on CPU and on Triton
(kernels/nms.py, the op ``pycompress::fm_nms_triton``) on CUDA. The ops return
indices and masks, so they have no gradient. The public functions, with their input
checks, are :func:`pycompress.functional.nms`, ``batched_nms``, ``fm_nms`` and
``apply_fm_nms``. (This module was ``pycompress.ops.nms``, a name that clashed with
the function ``pycompress.ops.nms``.)
"""

import torch

from pycompress import _extension  # has_ops(): the C++ schemas must exist before registering on them


def _dynamic_indices(boxes):
    # The number of kept boxes depends on the data.
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


def _nms_fake(boxes, scores, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4,
                 lambda: f"pycompress::nms: boxes should have shape (N, 4), got {tuple(boxes.shape)}")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: f"pycompress::nms: scores should have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    torch._check(scores.dtype == boxes.dtype,
                 lambda: f"pycompress::nms: boxes ({boxes.dtype}) and scores ({scores.dtype}) should share a dtype")
    return _dynamic_indices(boxes)


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


def _fm_nms_fake(objectness, class_probs, kernel_size):
    torch._check(objectness.dim() == 4, lambda: "pycompress::fm_nms: objectness should be (B, A, H, W)")
    torch._check(class_probs.dim() == 5, lambda: "pycompress::fm_nms: class_probs should be (B, A, C, H, W)")
    torch._check(tuple(class_probs.shape[:2]) + tuple(class_probs.shape[3:]) == tuple(objectness.shape),
                 lambda: f"pycompress::fm_nms: class_probs {tuple(class_probs.shape)} does not match objectness "
                         f"{tuple(objectness.shape)}")
    torch._check(kernel_size >= 1 and kernel_size % 2 == 1,
                 lambda: f"pycompress::fm_nms: kernel_size should be a positive odd integer, got {kernel_size}")
    return objectness.new_empty(objectness.shape, dtype=torch.bool)


if _extension.has_ops():
    torch.library.register_fake("pycompress::nms")(_nms_fake)
    torch.library.register_fake("pycompress::batched_nms")(_batched_nms_fake)
    torch.library.register_fake("pycompress::fm_nms")(_fm_nms_fake)

if _extension.triton_enabled():
    from pycompress.kernels.nms import fm_nms_triton

    torch.library.triton_op("pycompress::fm_nms_triton", fm_nms_triton, mutates_args=())
    if _extension.has_ops():  # the C++ op on a CUDA tensor runs the Triton op
        torch.library.register_kernel("pycompress::fm_nms", "cuda")(torch.ops.pycompress.fm_nms_triton.default)


def fm_nms_op(objectness: torch.Tensor):
    """The op computing FM-NMS on ``objectness``'s device: the Triton op on GPUs (so that
    ``torch.compile`` traces into its kernel), the C++ op otherwise."""
    if objectness.device.type != "cpu" and _extension.triton_enabled():
        return torch.ops.pycompress.fm_nms_triton
    _extension._assert_has_ops("pycompress::fm_nms")
    return torch.ops.pycompress.fm_nms
