"""Loss modules."""

from typing import Optional

import torch
from torch import nn

from pycompress.functional import (check_anchors, check_detection_loss_options, check_fused_linear_options,
                                   check_kd_hyperparameters, detection_distill_loss, fused_linear_kd_loss, kd_loss)


class KDLoss(nn.Module):
    r"""Fused knowledge-distillation loss (Hinton et al. 2015 and variants).

    .. math::
        L = \alpha \, T^2 \, D\big(\mathrm{softmax}(t/T), \mathrm{softmax}(s/T)\big)
            + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s))

    The forward computes the loss and the student's gradient in one fused pass
    over the logits (C++ on CPU, Triton on CUDA); backward only scales it. See
    :func:`pycompress.kd_loss` for every argument and the exact reductions.

    Args:
        temperature (float): softmax temperature T > 0 of the soft term.
        alpha (float): weight of the soft term; ``alpha < 1`` adds hard-label CE
            and needs a target.
        divergence (str): ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``mse_logits``.
        beta (float): JSD mixture weight of the teacher.
        reduction (str): ``none`` | ``sum`` | ``mean`` | ``batchmean``.
        ignore_index (int): target value of rows to skip.
        t2_scale (bool): scale the soft term by T^2.
        teacher_noise (float): Sau et al.'s multiplicative teacher noise sigma.
        generator (torch.Generator, optional): source of that noise.
        topk_tail (str): ``bucket`` | ``drop``: how a sparse ``(values, indices)``
            teacher's missing mass is read (see :func:`pycompress.kd_loss`).

    Shape:
        - student_logits: (N, V) or (B, L, V)
        - teacher_logits: same as student_logits, or a pair of (..., k) values and int64 indices
        - target: student_logits.shape[:-1], integer
        - output: scalar, or student_logits.shape[:-1] with ``reduction="none"``

    Example:
        >>> loss_fn = KDLoss(temperature=4.0, alpha=0.5)
        >>> loss = loss_fn(student(x), teacher(x).detach(), y)
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, reduction: str = "batchmean", ignore_index: int = -100, t2_scale: bool = True,
                 teacher_noise: float = 0.0, generator: Optional[torch.Generator] = None, topk_tail: str = "bucket"):
        super().__init__()
        check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, teacher_noise, topk_tail)
        self.topk_tail = topk_tail
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = float(beta)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.t2_scale = bool(t2_scale)
        self.teacher_noise = float(teacher_noise)
        self.generator = generator

    def forward(self, student_logits: torch.Tensor, teacher_logits,
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       divergence=self.divergence, beta=self.beta, reduction=self.reduction,
                       ignore_index=self.ignore_index, t2_scale=self.t2_scale, teacher_noise=self.teacher_noise,
                       generator=self.generator, topk_tail=self.topk_tail)

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}", f"alpha={self.alpha}", f"divergence={self.divergence!r}"]
        if self.divergence == "jsd":
            parts.append(f"beta={self.beta}")
        parts += [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}", f"t2_scale={self.t2_scale}"]
        if self.teacher_noise:
            parts.append(f"teacher_noise={self.teacher_noise}")
        return ", ".join(parts)


class FusedLinearKDLoss(nn.Module):
    r"""KD loss on the output projection, without materialising the N x V logits.

    Computes the same loss as :class:`KDLoss` on ``student_hidden @ student_weight.T
    (+ bias)`` against the teacher's logits, chunk by chunk: peak extra memory is
    O(chunk_size x V), never O(N x V), which is what makes distilling an LLM's 128k
    vocabulary over thousands of tokens fit. Gradients for the hidden states, the
    weight and the bias are produced in the forward pass; backward only scales them.

    Args:
        temperature, alpha, divergence, beta, ignore_index, t2_scale, topk_tail: as in
            :class:`KDLoss`.
        reduction (str): ``none`` | ``sum`` | ``mean`` | ``batchmean``; ``none`` gives
            per-row losses and runs the chunks again in backward.
        chunk_size (int, optional): rows per chunk; by default about 128 MiB of chunk
            buffers.

    Shape:
        - student_hidden: (N, H) or (B, L, H)
        - student_weight: (V, H); student_bias: (V,)
        - teacher_hidden: rows as student_hidden, (..., H_t); teacher_weight: (V, H_t)
        - or teacher_logits: (..., V), or a top-k pair of (..., k) values and indices
        - target: student_hidden.shape[:-1]
        - output: scalar, or student_hidden.shape[:-1] for reduction="none"

    Example:
        >>> loss_fn = FusedLinearKDLoss(temperature=2.0, alpha=0.5, reduction="mean")
        >>> loss = loss_fn(h_s, lm_head_s.weight, h_t, lm_head_t.weight, target=labels)
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, reduction: str = "batchmean", ignore_index: int = -100, t2_scale: bool = True,
                 chunk_size: Optional[int] = None, topk_tail: str = "bucket"):
        super().__init__()
        check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, topk_tail=topk_tail)
        check_fused_linear_options(chunk_size)
        self.temperature, self.alpha, self.divergence, self.beta = float(temperature), float(alpha), divergence, \
            float(beta)
        self.reduction, self.ignore_index, self.t2_scale = reduction, int(ignore_index), bool(t2_scale)
        self.chunk_size, self.topk_tail = chunk_size, topk_tail

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None, teacher_logits=None) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=self.temperature,
            alpha=self.alpha, divergence=self.divergence, beta=self.beta, reduction=self.reduction,
            ignore_index=self.ignore_index, t2_scale=self.t2_scale, topk_tail=self.topk_tail,
            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}", f"alpha={self.alpha}", f"divergence={self.divergence!r}"]
        if self.divergence == "jsd":
            parts.append(f"beta={self.beta}")
        parts += [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}", f"t2_scale={self.t2_scale}",
                  f"chunk_size={self.chunk_size or 'auto'}"]
        return ", ".join(parts)


class DetectionDistillLoss(nn.Module):
    r"""YOLOv2 loss with Mehta & Ozturk's (2018) teacher terms, fused (C++ on CPU, Triton on CUDA).

    Drop-in loss for a YOLO-style training loop: give it the student's and the teacher's raw
    head outputs and the encoded targets. With ``teacher_raw=None`` it is the plain YOLO loss.
    The map layout is fixed by ``docs/yolo_loss.md``: ``raw`` is ``(B, A, 5 + C, H, W)``, channels
    ``tx, ty`` (sigmoid: centre offset in the cell), ``tw, th`` (``w = p_w exp(tw)``), ``to``
    (sigmoid: objectness), then C class logits (softmax); anchors are ``(p_w, p_h)`` in grid cells;
    targets are the encoder's ``cls`` (-1 = no object), ``box`` ``(x*, y*, w*, h*)`` and
    ``labeled``. See :func:`pycompress.functional.detection_distill_loss` for the formula.

    Args:
        anchors (Tensor[A, 2]): anchor shapes ``(p_w, p_h)`` in grid cells (kept as a buffer).
        fm_nms (bool): FM-NMS (K = 3) on the teacher's map before the loss.
        objectness_scaling (bool): weight the teacher's class and box terms by its objectness.
        suppress_objectness (bool): FM-NMS also zeroes suppressed candidates' teacher objectness.
        lambda_distill (float): weight of the teacher terms, ``lambda_D``.
        lambda_coord, lambda_obj, lambda_noobj, lambda_cls (float): YOLO term weights.
        reduction (str): ``none`` (per image) | ``sum`` | ``mean`` (sum / B).

    Shape:
        - student_raw, teacher_raw: (B, A, 5 + C, H, W)
        - cls: (B, A, H, W) int64; box: (B, A, 4, H, W); labeled: (B,) bool (optional, default all True)
        - output: scalar, or (B,) with ``reduction="none"``

    Example:
        >>> loss_fn = DetectionDistillLoss(anchors)
        >>> loss = loss_fn(student(x), teacher(x), cls, box, labeled)
    """

    def __init__(self, anchors: torch.Tensor, fm_nms: bool = True, objectness_scaling: bool = True,
                 suppress_objectness: bool = False, lambda_distill: float = 1.0, lambda_coord: float = 1.0,
                 lambda_obj: float = 5.0, lambda_noobj: float = 1.0, lambda_cls: float = 1.0,
                 reduction: str = "mean"):
        super().__init__()
        check_anchors(anchors)
        check_detection_loss_options(fm_nms, objectness_scaling, suppress_objectness, lambda_distill, lambda_coord,
                                     lambda_obj, lambda_noobj, lambda_cls, reduction)
        self.register_buffer("anchors", anchors.detach().clone(), persistent=False)
        self.fm_nms = fm_nms
        self.objectness_scaling = objectness_scaling
        self.suppress_objectness = suppress_objectness
        self.lambda_distill = float(lambda_distill)
        self.lambda_coord = float(lambda_coord)
        self.lambda_obj = float(lambda_obj)
        self.lambda_noobj = float(lambda_noobj)
        self.lambda_cls = float(lambda_cls)
        self.reduction = reduction

    def forward(self, student_raw: torch.Tensor, teacher_raw: Optional[torch.Tensor], cls: torch.Tensor,
                box: torch.Tensor, labeled: Optional[torch.Tensor] = None) -> torch.Tensor:
        return detection_distill_loss(
            student_raw, teacher_raw, self.anchors, cls, box, labeled, fm_nms=self.fm_nms,
            objectness_scaling=self.objectness_scaling, suppress_objectness=self.suppress_objectness,
            lambda_distill=self.lambda_distill, lambda_coord=self.lambda_coord, lambda_obj=self.lambda_obj,
            lambda_noobj=self.lambda_noobj, lambda_cls=self.lambda_cls, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"num_anchors={self.anchors.shape[0]}, fm_nms={self.fm_nms}, "
                f"objectness_scaling={self.objectness_scaling}, suppress_objectness={self.suppress_objectness}, "
                f"lambda_distill={self.lambda_distill}, lambda_coord={self.lambda_coord}, "
                f"lambda_obj={self.lambda_obj}, lambda_noobj={self.lambda_noobj}, lambda_cls={self.lambda_cls}, "
                f"reduction={self.reduction!r}")
