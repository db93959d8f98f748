"""Functional forms of pycompress's losses (each module in :mod:`pycompress.nn` wraps one)."""

from typing import Optional

import torch

from pycompress import ops as _ops  # noqa: F401  (registers fake and autograd of the ops used here)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse_logits")
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, teacher_noise=0.0):
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
    if not teacher_noise >= 0:
        raise ValueError(f"teacher_noise must be >= 0, got {teacher_noise}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _check_kd_tensors(student, teacher, target, alpha, ignore_index):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student_logits must be (..., V) with V >= 1, got shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
                         "must have the same shape (same rows, same vocabulary)")
    if student.dtype != teacher.dtype:
        raise TypeError(f"student_logits ({student.dtype}) and teacher_logits ({teacher.dtype}) must share a "
                        "dtype; cast the teacher's logits")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits is on {teacher.device}")
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"alpha={alpha} < 1 weights a hard-label cross-entropy, so target is required")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.device != student.device:
        raise ValueError(f"target is on {target.device} but student_logits is on {student.device}")
    if target.shape != student.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(student.shape[:-1])} (student_logits without its last "
                         f"dim), got {tuple(target.shape)}")
    if not torch.compiler.is_compiling():  # a data-dependent check; the kernel re-checks it when compiled
        V = student.shape[-1]
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
            teacher_noise: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
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
        teacher_logits (Tensor[..., V]): teacher logits, same shape and dtype; never
            receives a gradient.
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

    Returns:
        Tensor: a scalar, or ``student_logits.shape[:-1]`` for ``reduction="none"``,
        in the logits' dtype. NaN or Inf in the logits gives NaN, as in PyTorch.

    Example:
        >>> s = torch.randn(8, 10, requires_grad=True); t = torch.randn(8, 10)
        >>> loss = kd_loss(s, t, temperature=4.0)
        >>> loss.backward()
    """
    check_kd_hyperparameters(temperature, alpha, divergence, beta, reduction, teacher_noise)
    _check_kd_tensors(student_logits, teacher_logits, target, alpha, ignore_index)
    teacher = teacher_logits.detach()
    if teacher_noise > 0:
        teacher = perturb_teacher(teacher, teacher_noise, generator)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = torch.ops.pycompress.kd_loss(student_logits, teacher, target, float(temperature), divergence,
                                           float(beta), float(alpha), bool(t2_scale), reduction, int(ignore_index),
                                           compute_grad)
    return loss


def block_sparse_conv2d(input: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                        bias: Optional[torch.Tensor], kernel_size, out_channels: int, stride=1, padding=0,
                        dilation=1, relu: bool = False) -> torch.Tensor:
    r"""2-D convolution with a block-sparse (BSR) weight; only nonzero blocks are multiplied.

    The weight is the GEMM view ``W`` (out_channels, in_channels * kh * kw) in BSR form
    (see :class:`pycompress.nn.BlockSparseConv2d`). groups = 1.

    .. math::
        \mathrm{out} = \mathrm{act}(\mathrm{conv2d}(\mathrm{input}, W) + \mathrm{bias}),
        \qquad \mathrm{act} = \mathrm{ReLU} \text{ if relu else identity}

    Args:
        input (Tensor[N, C, H, W]): float32 (bf16/fp16 are computed in fp32 and cast back).
        values (Tensor[nnzb, bk, bo]): the nonzero blocks, each stored k-major.
        col_idx (LongTensor[nnzb]): block column of each block.
        row_ptr (LongTensor[R + 1]): CSR-style offsets of each block row's blocks.
        bias (Tensor[out_channels], optional): added before the activation.
        kernel_size, stride, padding, dilation (int or (int, int)): as in ``F.conv2d``.
        out_channels (int): rows of ``W``; ``R * bo`` may exceed it by less than ``bo``.
        relu (bool): fuse a ReLU into the store.

    Returns:
        Tensor[N, out_channels, OH, OW] in the input's dtype.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    pair = torch.nn.modules.utils._pair
    dtype = input.dtype
    x = input if dtype == torch.float32 else input.float()
    b = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    out = torch.ops.pycompress.block_sparse_conv2d(
        x, values, col_idx, row_ptr, b, list(pair(kernel_size)), list(pair(stride)), list(pair(padding)),
        list(pair(dilation)), int(out_channels), bool(relu))
    return out if dtype == torch.float32 else out.to(dtype)
