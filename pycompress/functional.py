"""pycompress's public functions: the KD losses (each module in :mod:`pycompress.nn` wraps one),
the block-sparse convolution and the detector ops (NMS, batched NMS, FM-NMS)."""

import numbers
from typing import Optional

import torch

from pycompress import _extension
from pycompress import ops as _ops  # noqa: F401  (registers fake and autograd of the ops used here)
from pycompress.ops.block_sparse import block_sparse_conv2d_op, call_without_grad
from pycompress.ops.detection import fm_nms_op
from pycompress.ops.detection_loss import detection_distill_loss_op
from pycompress.ops.kd_loss import kd_loss_op

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse_logits")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
TOPK_TAILS = ("bucket", "drop")


def check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, teacher_noise=0.0, topk_tail="bucket"):
    """Validates KD hyperparameters; raises ValueError or TypeError naming the argument."""
    for name, value in (("temperature", temperature), ("alpha", alpha), ("beta", beta),
                        ("teacher_noise", teacher_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0 <= teacher_noise < float("inf"):
        raise ValueError(f"teacher_noise must be a finite number >= 0, got {teacher_noise}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if topk_tail not in TOPK_TAILS:
        raise ValueError(f"topk_tail must be one of {', '.join(TOPK_TAILS)}, got {topk_tail!r}")


def check_fused_linear_options(chunk_size):
    """The fused linear loss's own limits, beyond :func:`check_kd_hyperparameters`."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _check_topk_teacher(teacher, rows_shape, V, device):
    """Checks a sparse teacher ``(values, indices)`` for rows of shape ``rows_shape`` over
    ``V`` classes; returns it detached, with int64 indices."""
    if len(teacher) != 2:
        raise TypeError("a sparse teacher_logits must be a pair (topk_values, topk_indices)")
    values, indices = teacher
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"topk_values must be a floating-point Tensor, got {getattr(values, 'dtype', type(values))}")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"topk_indices must be an integer Tensor, got {getattr(indices, 'dtype', type(indices))}")
    if values.shape != indices.shape:
        raise ValueError(f"topk_values {tuple(values.shape)} and topk_indices {tuple(indices.shape)} must have the "
                         "same shape")
    if values.dim() != len(rows_shape) + 1 or values.shape[:-1] != rows_shape:
        raise ValueError(f"topk_values must have shape {tuple(rows_shape)} + (k,), one row per student row, "
                         f"got {tuple(values.shape)}")
    k = values.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k = {k} teacher entries per row must be in [1, V = {V}]")
    if values.device != device or indices.device != device:
        raise ValueError(f"topk_values and topk_indices must be on the student's device {device}")
    # Index range and duplicates are checked by the kernel, row by row, with ValueErrors.
    return values.detach(), indices.to(torch.int64)


def _check_dense_teacher(teacher, rows_shape, V, dtype, device):
    if not isinstance(teacher, torch.Tensor):
        raise TypeError(f"teacher_logits must be a Tensor or a (topk_values, topk_indices) pair, got "
                        f"{type(teacher).__name__}")
    if not teacher.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got {teacher.dtype}")
    if teacher.shape != (*rows_shape, V):
        raise ValueError(f"teacher_logits must have the student's shape {(*rows_shape, V)} (same rows, same "
                         f"vocabulary), got {tuple(teacher.shape)}")
    if teacher.dtype != dtype:
        raise TypeError(f"teacher_logits ({teacher.dtype}) must have the student's dtype {dtype}; cast the "
                        "teacher's logits")
    if teacher.device != device:
        raise ValueError(f"teacher_logits must be on the student's device {device}, got {teacher.device}")


def _check_floating(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_kd_tensors(student, target, alpha, ignore_index):
    _check_floating("student_logits", student)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student_logits must be (..., V) with V >= 1, got shape {tuple(student.shape)}")
    _check_target(target, student.shape[:-1], student.shape[-1], student.device, alpha, ignore_index)


def _check_target(target, rows_shape, V, device, alpha, ignore_index):
    """Checks class-index targets for rows of shape ``rows_shape`` over ``V`` classes."""
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"alpha={alpha} < 1 weights a hard-label cross-entropy, so target is required")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target must be on the student's device {device}, got {target.device}")
    if target.shape != rows_shape:
        raise ValueError(f"target must have shape {tuple(rows_shape)} (one class per row), got {tuple(target.shape)}")
    if not torch.compiler.is_compiling():  # a data-dependent check; the kernel re-checks it when compiled
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            value = target[bad].flatten()[0].item()
            raise ValueError(f"target holds {value}, outside [0, {V}) and not ignore_index ({ignore_index})")


def perturb_teacher(teacher_logits: torch.Tensor, sigma: float,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sau & Balasubramanian's noisy teacher: ``t * (1 + sigma * xi)``, ``xi ~ N(0, 1)`` per element.

    Draws from ``generator`` (or torch's default one), so ``torch.manual_seed``
    makes it reproducible. Allocates one logits-sized tensor.
    """
    noise = torch.randn(teacher_logits.shape, generator=generator, dtype=teacher_logits.dtype,
                        device=teacher_logits.device)
    return noise.mul_(sigma).add_(1.0).mul_(teacher_logits)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: Optional[torch.Tensor] = None, *,
            temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            reduction: str = "batchmean", ignore_index: int = -100, t2_scale: bool = True,
            teacher_noise: float = 0.0, generator: Optional[torch.Generator] = None,
            topk_tail: str = "bucket") -> torch.Tensor:
    r"""Knowledge-distillation loss, fused: one pass computes the loss and the student's gradient.

    .. math::
        L = \alpha \, c \, D\big(\mathrm{softmax}(t/T), \mathrm{softmax}(s/T)\big)
            + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s)),
        \qquad c = T^2 \text{ if t2\_scale else } 1

    ``D`` is ``forward_kl`` KL(p_t || p_s) (Hinton et al. 2015), ``reverse_kl``
    KL(p_s || p_t), ``jsd`` the generalized Jensen-Shannon divergence
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``
    (it vanishes identically at beta = 0 and 1; ``JSD / beta`` tends to forward KL as
    beta -> 0), or ``mse_logits``, Ba & Caruana's ``1/2 ||s - t||^2`` on raw logits
    (temperature and ``c`` do not apply).

    Args:
        student_logits (Tensor[..., V]): student logits, fp32/bf16/fp16/fp64, any
            strides (rows are read in place when the class dim is contiguous).
        teacher_logits (Tensor[..., V] or (Tensor[..., k], LongTensor[..., k])): teacher
            logits, same shape and dtype; never receives a gradient. A pair
            ``(topk_values, topk_indices)`` is a sparse teacher (cached or served top-k
            outputs); memory for the teacher then scales with k. See ``topk_tail``.
        target (LongTensor[...], optional): class indices; needed when ``alpha < 1``.
            Rows whose target is ``ignore_index`` contribute nothing, to the loss or
            to the gradient, in every term.
        temperature (float): T > 0 for the soft terms. The hard CE always uses T = 1.
        alpha (float): weight of the soft term, in [0, 1].
        divergence (str): ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``mse_logits``.
        beta (float): JSD's teacher weight in the mixture, in [0, 1].
        reduction (str): how row losses (a row is one ``V``-vector) combine:
            ``none`` keeps them, shape ``student_logits.shape[:-1]``; ``sum`` adds the
            valid rows; ``mean`` divides that sum by the number of valid rows;
            ``batchmean`` divides it by ``input.size(0) * n_valid / n_rows``, which is
            ``input.size(0)`` when no row is ignored (exactly ``F.kl_div``'s
            ``batchmean``: a (B, L, V) input divides by B) and the number of valid
            rows for a 2-D input. A batch with no valid row has loss 0 and gradient 0
            (PyTorch's cross-entropy gives NaN there; a padding-only micro-batch
            should not poison training). Note ``F.kl_div``'s ``mean`` divides by
            N * V; ours is a mean over rows.
        ignore_index (int): target value marking a row to skip.
        t2_scale (bool): multiply the soft term by T^2 so its gradients keep their
            scale as T grows (Hinton et al.).
        teacher_noise (float): sigma of Sau et al.'s multiplicative noise on the teacher
            logits, ``t (1 + sigma xi)``; 0 disables it. Uses ``generator``.
        generator (torch.Generator, optional): source of the teacher noise.
        topk_tail (str): how a sparse teacher's missing mass is read. ``bucket``
            (default): ``topk_values`` are teacher log-probabilities (``log_softmax``
            at T = 1) and the remaining mass ``1 - sum(exp(values))`` is one extra
            "tail" class; the student's tail is its probability summed over all other
            classes, and the teacher's k + 1 buckets are tempered as k + 1 classes.
            ``drop``: the tail is discarded and both distributions are renormalised
            over the k classes (values may be logits or log-probabilities alike); the
            other classes get no soft gradient. Both equal the dense loss at k = V.
            ``mse_logits`` regresses the k given logits and ignores the tail.

    Returns:
        Tensor: a scalar, or ``student_logits.shape[:-1]`` for ``reduction="none"``,
        in the logits' dtype. NaN or Inf in the logits gives NaN, as in PyTorch.

    Example:
        >>> s = torch.randn(8, 10, requires_grad=True); t = torch.randn(8, 10)
        >>> loss = kd_loss(s, t, temperature=4.0)
        >>> loss.backward()
    """
    check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, teacher_noise, topk_tail)
    _check_kd_tensors(student_logits, target, alpha, ignore_index)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if isinstance(teacher_logits, (tuple, list)):
        if teacher_noise > 0:
            raise ValueError("teacher_noise perturbs dense teacher logits; it does not apply to a top-k teacher")
        values, indices = _check_topk_teacher(teacher_logits, student_logits.shape[:-1], student_logits.shape[-1],
                                              student_logits.device)
        loss, _ = kd_loss_op(student_logits, topk=True)(
            student_logits, values, indices, target, float(temperature), divergence, float(beta), float(alpha),
            bool(t2_scale), reduction, int(ignore_index), topk_tail, compute_grad)
        return loss
    _check_dense_teacher(teacher_logits, student_logits.shape[:-1], student_logits.shape[-1], student_logits.dtype,
                         student_logits.device)
    teacher = teacher_logits.detach()
    if teacher_noise > 0:
        teacher = perturb_teacher(teacher, teacher_noise, generator)
    loss, _ = kd_loss_op(student_logits)(student_logits, teacher, target, float(temperature), divergence,
                                         float(beta), float(alpha), bool(t2_scale), reduction, int(ignore_index),
                                         compute_grad)
    return loss


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                         target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                         teacher_bias: Optional[torch.Tensor] = None, teacher_logits=None,
                         temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl",
                         beta: float = 0.5, reduction: str = "batchmean", ignore_index: int = -100,
                         t2_scale: bool = True, topk_tail: str = "bucket",
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    r"""KD loss of the logits ``student_hidden @ student_weight.T (+ bias)`` without materialising them.

    The same loss as :func:`kd_loss` on those logits (every argument means the same),
    computed over chunks of rows: per chunk the logits are a GEMM, the fused KD op
    gives the loss and the logits' gradient in one pass, and the gradients of the
    hidden states, weight and bias are accumulated at once, so peak extra memory is
    O(chunk_size x V) rather than O(N x V).

    Args:
        student_hidden (Tensor[..., H]): the student's last hidden states.
        student_weight (Tensor[V, H]): the student's output projection.
        teacher_hidden (Tensor[..., H_t], optional): the teacher's hidden states (H_t may
            differ from H); with ``teacher_weight`` (Tensor[V, H_t]).
        teacher_weight (Tensor[V, H_t], optional): the teacher's output projection.
        target (LongTensor[...], optional): class indices, needed when ``alpha < 1``.
        student_bias (Tensor[V], optional), teacher_bias (Tensor[V], optional): biases.
        teacher_logits (Tensor[..., V] or pair, optional): precomputed teacher logits, or
            a top-k pair ``(values, indices)`` (see ``topk_tail`` in :func:`kd_loss`),
            instead of ``teacher_hidden`` and ``teacher_weight``.
        reduction (str): ``none`` | ``sum`` | ``mean`` | ``batchmean``. ``none`` returns
            per-row losses; its backward runs the chunks again (its logits GEMMs twice), since
            the weight gradient depends on each row's incoming gradient.
        chunk_size (int, optional): rows per chunk; by default chosen from N, V and the
            dtype so that the chunk buffers take about 128 MiB.

    Returns:
        Tensor: the scalar loss, or ``student_hidden.shape[:-1]`` for ``reduction="none"``,
        in the hidden states' dtype.
    """
    from pycompress.ops.fused_linear_kd import fused_linear_kd_loss_op

    check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, topk_tail=topk_tail)
    check_fused_linear_options(chunk_size)
    _check_floating("student_hidden", student_hidden)
    _check_floating("student_weight", student_weight)
    if student_weight.dim() != 2 or student_hidden.dim() < 1 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_weight must be (V, H) with H = student_hidden.shape[-1] = "
                         f"{student_hidden.shape[-1] if student_hidden.dim() else None}, got {tuple(student_weight.shape)}")
    V, rows = student_weight.shape[0], student_hidden.shape[:-1]
    if V < 1:
        raise ValueError(f"student_weight must have V >= 1 rows (the vocabulary), got shape "
                         f"{tuple(student_weight.shape)}")
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if x is None:
            continue
        _check_floating(name, x)
        if x.dtype != student_hidden.dtype:
            raise TypeError(f"{name} ({x.dtype}) must have student_hidden's dtype {student_hidden.dtype}")
        if x.device != student_hidden.device:
            raise ValueError(f"{name} must be on student_hidden's device {student_hidden.device}, got {x.device}")
    if student_bias is not None and student_bias.shape != (V,):
        raise ValueError(f"student_bias must have shape ({V},), got {tuple(student_bias.shape)}")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight go together")
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias belongs to teacher_weight; with teacher_logits add it to the logits instead")
    if (teacher_hidden is None) == (teacher_logits is None):
        raise ValueError("give the teacher either as teacher_hidden and teacher_weight, or as teacher_logits")
    values = indices = dense = None
    if teacher_hidden is not None:
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_weight must be (V, H_t) with H_t = teacher_hidden.shape[-1] = "
                             f"{teacher_hidden.shape[-1]}, got {tuple(teacher_weight.shape)}")
        if teacher_weight.shape[0] != V:
            raise ValueError(f"the teacher's vocabulary ({teacher_weight.shape[0]}) differs from the student's ({V})")
        if teacher_hidden.shape[:-1] != rows:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have student_hidden's rows "
                             f"{tuple(rows)}")
        if teacher_bias is not None and teacher_bias.shape != (V,):
            raise ValueError(f"teacher_bias must have shape ({V},), got {tuple(teacher_bias.shape)}")
    elif isinstance(teacher_logits, (tuple, list)):
        values, indices = _check_topk_teacher(teacher_logits, rows, V, student_hidden.device)
    else:
        _check_dense_teacher(teacher_logits, rows, V, student_hidden.dtype, student_hidden.device)
        dense = teacher_logits.detach()
    _check_target(target, rows, V, student_hidden.device, alpha, ignore_index)
    # reduction="none": the gradients come from backward's second pass, not from this one.
    compute_grad = reduction != "none" and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    detach = (lambda x: None if x is None else x.detach())
    loss, *_ = fused_linear_kd_loss_op(
        student_hidden, student_weight, student_bias, detach(teacher_hidden), detach(teacher_weight),
        detach(teacher_bias), dense, values, indices, target, float(temperature), divergence, float(beta),
        float(alpha), bool(t2_scale), reduction, int(ignore_index), topk_tail, chunk_size or 0, compute_grad)
    return loss


# Input dtypes the op takes natively (fp32 accumulation, output in the input's dtype).
_BLOCK_SPARSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _int_pair(v) -> list:
    """[v, v] for an int, else list(v): torch's _pair without its abc.Iterable check, which costs
    microseconds per call on the block-sparse layers' inference path."""
    return [v, v] if isinstance(v, int) else list(v)


def block_sparse_conv2d(input: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                        bias: Optional[torch.Tensor], kernel_size, out_channels: int, stride=1, padding=0,
                        dilation=1, relu: bool = False, residual: Optional[torch.Tensor] = None,
                        negative_slope: float = 0.0, pool: int = 1, out_padding: int = 0) -> torch.Tensor:
    r"""2-D convolution with a block-sparse (BSR) weight; only nonzero blocks are multiplied.

    The weight is the GEMM view ``W`` (out_channels, in_channels * kh * kw) in BSR form
    (see :class:`pycompress.nn.BlockSparseConv2d`). groups = 1.

    .. math::
        \mathrm{out} = \mathrm{maxpool}_p(\mathrm{act}(\mathrm{conv2d}(\mathrm{input}, W) + \mathrm{bias}
        + \mathrm{residual})), \qquad \mathrm{act} = \mathrm{LeakyReLU}_{\mathrm{negative\_slope}}
        \text{ if relu else identity}

    Args:
        input (Tensor[N, C, H, W]): float32, bfloat16 or float16, accumulated in fp32 and
            returned in the input's dtype (other dtypes go through float32).
        values (Tensor[nnzb, bk, bo]): the nonzero blocks, each stored k-major.
        col_idx (LongTensor[nnzb]): block column of each block.
        row_ptr (LongTensor[R + 1]): CSR-style offsets of each block row's blocks.
        bias (Tensor[out_channels], optional): added before the activation.
        kernel_size, stride, padding, dilation (int or (int, int)): as in ``F.conv2d``.
        out_channels (int): rows of ``W``; ``R * bo`` may exceed it by less than ``bo``.
        relu (bool): fuse a ReLU into the store (after the residual add).
        residual (Tensor[N, out_channels, OH, OW], optional): added in the store, e.g. a
            ResNet block's shortcut; same dtype as ``input``.
        negative_slope (float): with ``relu``, the slope below zero: 0 is ReLU, > 0
            LeakyReLU (negative slopes are refused: the fused pool needs a monotone act).
        pool (int): ``p > 1`` fuses ``F.max_pool2d(out, p)`` (stride p, floor mode) into
            the store, so the unpooled output is never written; not with ``residual``.
        out_padding (int): ``q > 0`` returns the output as the interior of planes with q
            zero pixels around them (a strided view, same values), which the next
            block-sparse conv of stride 1 and padding q reads without copying it into a
            padded buffer (:func:`pycompress.sparsity.fuse_epilogues` sets it).

    Returns:
        Tensor[N, out_channels, OH // pool, OW // pool] in the input's dtype.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    for name, v in (("pool", pool), ("out_padding", out_padding)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    dtype = input.dtype
    x = input if dtype in _BLOCK_SPARSE_DTYPES else input.float()
    b = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        residual = residual.to(x.dtype)
    args = (x, values, col_idx, row_ptr, b, _int_pair(kernel_size), _int_pair(stride), _int_pair(padding),
            _int_pair(dilation), int(out_channels), bool(relu), residual, float(negative_slope), pool, out_padding)
    op = block_sparse_conv2d_op(x)
    inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    out = call_without_grad(op, *args) if inference else op(*args)
    return out if out.dtype == dtype else out.to(dtype)


# --- detector ops -------------------------------------------------------------------------------

def _check_box_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} should be a Tensor, got {type(x).__name__}")


def _check_boxes(boxes, scores):
    _check_box_tensor("boxes", boxes)
    _check_box_tensor("scores", scores)
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
        A NaN score ranks above every other score (``torch.sort``'s order, as in
        torchvision); a NaN coordinate gives NaN IoUs, which suppress nothing.

    Float32 and float64 are computed in their own precision, float16 and
    bfloat16 in float32.

    Example:
        >>> keep = nms(boxes, scores, 0.5)
    """
    _check_boxes(boxes, scores)
    _extension._assert_has_ops("pycompress::nms")
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
    _check_box_tensor("idxs", idxs)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs should have shape ({boxes.shape[0]},) to match boxes, got {tuple(idxs.shape)}")
    if idxs.is_floating_point() or idxs.is_complex():
        raise TypeError(f"idxs should be an integer tensor, got {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"idxs ({idxs.device}) should be on the device of boxes ({boxes.device})")
    _extension._assert_has_ops("pycompress::batched_nms")
    return torch.ops.pycompress.batched_nms(boxes, scores, idxs, _check_threshold(iou_threshold))


def _check_fm_nms(objectness, class_probs, kernel_size, suppress_objectness, validate):
    _check_box_tensor("objectness", objectness)
    _check_box_tensor("class_probs", class_probs)
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
    descending, ties to the lower flat index ``a*H*W + h*W + w``. A NaN objectness
    counts as the lowest score (visited after -inf), so it never suppresses another
    candidate; :func:`nms` instead ranks NaN scores first, as torchvision (and ``torch.sort``) do. A candidate not
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
    return fm_nms_op(objectness)(objectness, class_probs, int(kernel_size))


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


DETECTION_REDUCTIONS = ("none", "sum", "mean")
FM_NMS_KERNEL_SIZE = 3  # Mehta & Ozturk's FM-NMS window


def check_detection_loss_options(fm_nms, objectness_scaling, suppress_objectness, lambda_distill, lambda_coord,
                                 lambda_obj, lambda_noobj, lambda_cls, reduction):
    """Validates the options of :func:`detection_distill_loss`; raises ValueError or TypeError naming the argument."""
    for name, value in (("fm_nms", fm_nms), ("objectness_scaling", objectness_scaling),
                        ("suppress_objectness", suppress_objectness)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for name, value in (("lambda_distill", lambda_distill), ("lambda_coord", lambda_coord),
                        ("lambda_obj", lambda_obj), ("lambda_noobj", lambda_noobj), ("lambda_cls", lambda_cls)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if reduction not in DETECTION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(DETECTION_REDUCTIONS)}, got {reduction!r}")


def check_anchors(anchors):
    """Anchors must be a floating (A, 2) tensor of positive, finite (p_w, p_h) in grid cells."""
    _check_floating("anchors", anchors)
    if anchors.dim() != 2 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must have shape (A, 2) of (p_w, p_h), got {tuple(anchors.shape)}")
    if not torch.compiler.is_compiling() and not bool(((anchors > 0) & anchors.isfinite()).all()):
        raise ValueError(f"anchors must be positive and finite, got {anchors.tolist()}")


def _check_detection_tensors(student, teacher, anchors, cls, box, labeled):
    _check_floating("student_raw", student)
    if student.dim() != 5 or student.shape[2] < 6:
        raise ValueError(f"student_raw must be (B, A, 5 + C, H, W) with C >= 1 (docs/yolo_loss.md), got shape "
                         f"{tuple(student.shape)}")
    B, A, C5, H, W = student.shape
    device = student.device
    if teacher is not None:
        _check_floating("teacher_raw", teacher)
        if teacher.shape != student.shape:
            raise ValueError(f"teacher_raw must have the student's shape {tuple(student.shape)}, got "
                             f"{tuple(teacher.shape)}")
        if teacher.dtype != student.dtype:
            raise TypeError(f"teacher_raw ({teacher.dtype}) must have the student's dtype {student.dtype}")
    check_anchors(anchors)
    if anchors.shape[0] != A:
        raise ValueError(f"anchors must have one row per anchor of the map, A = {A}, got {anchors.shape[0]}")
    if not isinstance(cls, torch.Tensor):
        raise TypeError(f"cls must be a Tensor, got {type(cls).__name__}")
    if cls.dtype != torch.int64:
        raise TypeError(f"cls must be int64 class indices (-1 = no object), got {cls.dtype}")
    if cls.shape != (B, A, H, W):
        raise ValueError(f"cls must have shape (B, A, H, W) = {(B, A, H, W)}, got {tuple(cls.shape)}")
    _check_floating("box", box)
    if box.shape != (B, A, 4, H, W):
        raise ValueError(f"box must have shape (B, A, 4, H, W) = {(B, A, 4, H, W)}, got {tuple(box.shape)}")
    if not isinstance(labeled, torch.Tensor):
        raise TypeError(f"labeled must be a Tensor, got {type(labeled).__name__}")
    if labeled.dtype != torch.bool:
        raise TypeError(f"labeled must be a bool tensor, got {labeled.dtype}")
    if labeled.shape != (B,):
        raise ValueError(f"labeled must have shape (B,) = {(B,)}, got {tuple(labeled.shape)}")
    for name, x in (("teacher_raw", teacher), ("anchors", anchors), ("cls", cls), ("box", box), ("labeled", labeled)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {x.device}")
    if not torch.compiler.is_compiling() and cls.numel():  # data-dependent: skipped when traced
        C = C5 - 5
        lo, hi = int(cls.min()), int(cls.max())
        if lo < -1 or hi >= C:
            raise ValueError(f"cls must hold -1 (no object) or a class in [0, {C}), got values in [{lo}, {hi}]")


def teacher_fm_nms_keep(teacher_raw: torch.Tensor) -> torch.Tensor:
    """FM-NMS keep mask (B, A, H, W) of a teacher raw map: ``fm_nms(sigmoid(to), softmax(classes), K=3)``."""
    t = teacher_raw.detach()
    return fm_nms(torch.sigmoid(t[:, :, 4]), torch.softmax(t[:, :, 5:], dim=2), FM_NMS_KERNEL_SIZE)


def detection_distill_loss(student_raw: torch.Tensor, teacher_raw: Optional[torch.Tensor], anchors: torch.Tensor,
                           cls: torch.Tensor, box: torch.Tensor, labeled: Optional[torch.Tensor] = None, *,
                           fm_nms: bool = True, objectness_scaling: bool = True, suppress_objectness: bool = False,
                           lambda_distill: float = 1.0, lambda_coord: float = 1.0, lambda_obj: float = 5.0,
                           lambda_noobj: float = 1.0, lambda_cls: float = 1.0, reduction: str = "mean",
                           teacher_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""YOLOv2 loss plus Mehta & Ozturk's (2018) distillation terms, fused: one pass computes the loss and
    the gradient with respect to the student's raw map.

    The map layout, the targets and every term are those of ``docs/yolo_loss.md``. With
    ``o = sigmoid(to)``, ``p = softmax(class logits)``, ``b = (sigmoid(tx), sigmoid(ty), tw, th)``:

    .. math::
        L = \sum_{\text{resp}} \big[\lambda_{coord} \|b - b^*\|^2 + \lambda_{obj} (o - \mathrm{IoU})^2
            + \lambda_{cls} \|p - \mathbb{1}_{cls}\|^2\big] + \sum_{\text{other, labeled}} \lambda_{noobj} o^2
            + \lambda_D \sum_{\text{all}} \big[(o - o_T)^2 + s \lambda_{cls} \|p - p_T\|^2
            + s \lambda_{coord} \|b - b_T\|^2\big]

    where the IoU (decoded prediction vs. ground truth) is a constant, the teacher's values are
    detached, FM-NMS (K = 3, :func:`fm_nms` on ``o_T`` and ``p_T``) zeroes ``p_T``
    at suppressed candidates (and ``o_T`` with ``suppress_objectness``), and ``s = o_T`` after
    FM-NMS with ``objectness_scaling``, else 1. Unlabeled images get only the teacher terms.

    Args:
        student_raw (Tensor[B, A, 5 + C, H, W]): the student head's raw output; channels
            ``tx, ty, tw, th, to`` then C class logits. fp32, bf16, fp16 (computed in fp32) or fp64.
        teacher_raw (Tensor[B, A, 5 + C, H, W] or None): the teacher's raw map, same shape and
            dtype, never differentiated. None gives the plain YOLO loss.
        anchors (Tensor[A, 2]): ``(p_w, p_h)`` per anchor in grid cells, positive.
        cls (LongTensor[B, A, H, W]): class at responsible anchors, -1 elsewhere.
        box (Tensor[B, A, 4, H, W]): ``(x*, y*, w*, h*)`` at responsible anchors (zero elsewhere).
        labeled (BoolTensor[B], optional): False for images of the unlabeled pool; default all True.
        fm_nms (bool): run FM-NMS on the teacher's map first.
        objectness_scaling (bool): weight the teacher's class and box terms by ``o_T``.
        suppress_objectness (bool): FM-NMS also zeroes the suppressed candidates' ``o_T``.
        lambda_distill, lambda_coord, lambda_obj, lambda_noobj, lambda_cls (float): term weights, >= 0.
        reduction (str): ``none`` (one loss per image, shape (B,)), ``sum``, or ``mean`` (sum / B).
        teacher_keep (BoolTensor[B, A, H, W], optional): the teacher's FM-NMS keep mask when it was
            computed ahead (:func:`teacher_fm_nms_keep`, e.g. by a teacher cache); used only with
            ``fm_nms``. Default: computed here from ``teacher_raw``.

    Returns:
        Tensor: a scalar, or (B,) for ``reduction="none"``, in the student's dtype.

    Example:
        >>> loss = detection_distill_loss(student(x), teacher(x), anchors, cls, box, labeled)
        >>> loss.backward()
    """
    check_detection_loss_options(fm_nms, objectness_scaling, suppress_objectness, lambda_distill, lambda_coord,
                                 lambda_obj, lambda_noobj, lambda_cls, reduction)
    if labeled is None and isinstance(student_raw, torch.Tensor):
        labeled = torch.ones(student_raw.shape[0], dtype=torch.bool, device=student_raw.device)
    _check_detection_tensors(student_raw, teacher_raw, anchors, cls, box, labeled)
    teacher = None if teacher_raw is None else teacher_raw.detach()
    keep = None
    if teacher is not None and fm_nms:
        keep = teacher_fm_nms_keep(teacher) if teacher_keep is None else teacher_keep
        keep_shape = teacher.shape[:2] + teacher.shape[3:]
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != keep_shape:
            raise ValueError(f"teacher_keep must be a bool tensor of shape (B, A, H, W) = {tuple(keep_shape)}, got "
                             f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    compute_grad = torch.is_grad_enabled() and student_raw.requires_grad
    loss, _ = detection_distill_loss_op(student_raw)(
        student_raw, teacher, keep, anchors, cls, box.detach(), labeled, objectness_scaling, suppress_objectness,
        float(lambda_distill), float(lambda_coord), float(lambda_obj), float(lambda_noobj), float(lambda_cls),
        reduction, compute_grad)
    return loss
