"""Distilling Hugging Face ``transformers`` causal LMs with the fused linear KD loss.

``causal_lm_kd_loss(student, teacher, batch)`` runs both models up to their last
hidden states and hands those and the ``lm_head`` weights to
:func:`pycompress.fused_linear_kd_loss`, so neither model's (tokens x vocabulary)
logits are ever materialised. :class:`DistillationTrainer` is a
``transformers.Trainer`` whose ``compute_loss`` is that helper, and
:func:`distillation_trainer` makes the same of any ``Trainer`` subclass, such as TRL's.

transformers is imported lazily: ``import pycompress`` never needs it, and this
module imports without it (only the trainer classes require it, when built).
See docs/transformers.md for when the fused loss equals the eager one.
"""

import functools
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

import pycompress

IGNORE_INDEX = -100  # what transformers' data collators and losses use for padding and prompt tokens

# Rows per chunk of the top-k teacher's logits: about this many bytes of logits at a time.
_TOPK_CHUNK_BYTES = 64 << 20

# Config fields through which a model's logits differ from lm_head(last_hidden_state);
# the fused loss would silently compute another loss for such a model.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

TopkTeacher = Tuple[torch.Tensor, torch.Tensor]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DistributedDataParallel or torch.compile wrapper."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _output_projection(model: torch.nn.Module, name: str):
    """(weight (V, H), bias (V,) or None) of a causal LM whose logits are exactly lm_head(last_hidden_state)."""
    model = _unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{name} must be a transformers causal LM with a Linear output projection "
                        f"(get_output_embeddings()), got {type(model).__name__}")
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 0, 1, 1.0):
            raise ValueError(f"{name}'s config sets {field}={value}: its logits are not lm_head(hidden states), so "
                             "the fused loss would not compute its distillation loss")
    return head.weight, head.bias


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    if "input_ids" not in batch:
        raise ValueError(f"batch must hold input_ids (and optionally attention_mask, labels), got keys {list(batch)}")
    return {k: v for k, v in batch.items() if k != "labels"}


def shifted_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The next-token target of every position, (B, L): ``labels`` (``input_ids`` when the batch
    has none) shifted left by one, with ``IGNORE_INDEX`` at the last position and wherever the
    target token is padding (``attention_mask == 0``).

    This is transformers' own causal-LM shift (it pads ``labels`` on the right rather than
    cutting the last position), so the hidden states need no slicing copy.
    """
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _student_hidden(student: torch.nn.Module, inputs: dict) -> torch.Tensor:
    # Through the student's own forward (and so through any DDP wrapper, which must see it), asking
    # for the hidden states and for the logits of the last position only (B x V, not B x L x V).
    # The per-layer states it returns are kept for backward anyway.
    out = student(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


@torch.no_grad()
def _teacher_hidden(teacher: torch.nn.Module, inputs: dict) -> torch.Tensor:
    # Through the base model: output_hidden_states would keep every layer's states alive.
    return _unwrap(teacher).base_model(**inputs, use_cache=False).last_hidden_state


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: Mapping[str, torch.Tensor], k: int,
                 chunk_size: Optional[int] = None) -> TopkTeacher:
    """The teacher's top-k next-token log-probabilities at every position, computed in chunks of rows.

    What a cache of teacher outputs would hold (pass the pair as ``teacher`` to
    :func:`causal_lm_kd_loss`); never more than one chunk of logits exists at a time.

    Args:
        teacher: a transformers causal LM.
        batch: ``input_ids`` (B, L), optionally ``attention_mask`` and other model inputs.
        k (int): entries per position, in [1, V].
        chunk_size (int, optional): rows (positions) per chunk; by default about 64 MiB of logits.

    Returns:
        (Tensor[B, L, k], LongTensor[B, L, k]): ``log_softmax`` values (at temperature 1) in
        descending order, and their token ids.
    """
    weight, bias = _output_projection(teacher, "teacher")
    V = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, {V}], got {k!r}")
    hidden = _teacher_hidden(teacher, _model_inputs(batch))
    rows = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_size or max(1, _TOPK_CHUNK_BYTES // (V * rows.element_size()))
    values, indices = [], []
    for start in range(0, rows.shape[0], step):
        logits = F.linear(rows[start:start + step], weight, bias)
        top = torch.log_softmax(logits.float(), -1).topk(k, -1)
        values.append(top.values.to(rows.dtype))
        indices.append(top.indices)
    shape = (*hidden.shape[:-1], k)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)


def causal_lm_kd_loss(student: torch.nn.Module, teacher: Union[torch.nn.Module, TopkTeacher],
                      batch: Mapping[str, torch.Tensor], *, temperature: float = 1.0, alpha: float = 0.5,
                      divergence: str = "forward_kl", beta: float = 0.5, topk: Optional[int] = None,
                      topk_tail: str = "bucket", num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                      chunk_size: Optional[int] = None) -> torch.Tensor:
    r"""Distillation loss of a transformers causal LM, without materialising any logits.

    Per next-token position (the label shift and padding as in transformers' causal-LM loss,
    see :func:`shifted_targets`), the row loss of :func:`pycompress.kd_loss`:
    ``alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(y, p_s)`` (or the chosen ``divergence``),
    averaged over the positions whose target is not ``-100``. Computed by
    :func:`pycompress.fused_linear_kd_loss` from both models' last hidden states and
    ``lm_head`` weights (and biases): peak extra memory is O(chunk x V), not O(B L V).

    Tied embeddings need nothing special (``lm_head.weight`` is the embedding matrix and
    autograd adds both gradients); the teacher's hidden size may differ from the student's;
    the vocabularies must be equal. The teacher runs under ``no_grad``; the caller puts it in
    eval mode. Weights and the teacher's states are cast to the student's hidden-state dtype
    (what autocast does to the logits GEMM).

    Args:
        student: a transformers causal LM (or a DDP / ``torch.compile`` wrapper of one) that
            accepts ``output_hidden_states`` and ``logits_to_keep``.
        teacher: a transformers causal LM with the student's vocabulary, or a precomputed
            top-k teacher ``(log-prob values, token ids)``, each (B, L, k), aligned with
            ``input_ids`` (position i predicts token i + 1), as :func:`teacher_topk` returns.
        batch: ``input_ids`` (B, L); optionally ``attention_mask`` (B, L), ``labels`` (B, L)
            (``-100`` = ignore; default ``input_ids``) and other model inputs such as
            ``position_ids``, passed to both models.
        temperature, alpha, divergence, beta, topk_tail, chunk_size: as in
            :func:`pycompress.fused_linear_kd_loss`.
        topk (int, optional): distil from the live teacher's top-k log-probabilities only
            (:func:`teacher_topk`, read with ``topk_tail``) instead of its full distribution.
        num_items_in_batch (int or Tensor, optional): divide the summed loss by this count of
            valid targets instead of this batch's (what ``transformers.Trainer`` passes so that
            gradient accumulation averages over all accumulated tokens).

    Returns:
        Tensor: the scalar loss, in the student's hidden-state dtype.
    """
    s_weight, s_bias = _output_projection(student, "student")
    inputs = _model_inputs(batch)
    target = shifted_targets(batch)
    if isinstance(teacher, torch.nn.Module):
        t_weight, t_bias = _output_projection(teacher, "teacher")
        if t_weight.shape[0] != s_weight.shape[0]:
            raise ValueError(f"teacher's vocabulary ({t_weight.shape[0]}) differs from the student's "
                             f"({s_weight.shape[0]}): distillation compares their distributions token by token")
        if topk is not None:
            teacher = teacher_topk(teacher, batch, topk, chunk_size)
    elif topk is not None:
        raise ValueError("topk selects the live teacher's top-k; a precomputed top-k teacher already is one")
    if not isinstance(teacher, torch.nn.Module) and not (isinstance(teacher, (tuple, list)) and len(teacher) == 2):
        raise TypeError(f"teacher must be a transformers causal LM or a (topk_values, topk_indices) pair, got "
                        f"{type(teacher).__name__}")

    hidden = _student_hidden(student, inputs)
    dtype = hidden.dtype
    cast = (lambda x: None if x is None else x.to(dtype))  # noqa: E731
    if isinstance(teacher, torch.nn.Module):
        t_hidden = _teacher_hidden(teacher, inputs)
        teacher_args = dict(teacher_hidden=cast(t_hidden), teacher_weight=cast(t_weight), teacher_bias=cast(t_bias))
    else:
        teacher_args = dict(teacher_logits=(cast(teacher[0]), teacher[1]))
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = pycompress.fused_linear_kd_loss(
        hidden, cast(s_weight), target=target, student_bias=cast(s_bias), **teacher_args, temperature=temperature,
        alpha=alpha, divergence=divergence, beta=beta, reduction=reduction, ignore_index=IGNORE_INDEX,
        topk_tail=topk_tail, chunk_size=chunk_size)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@functools.lru_cache(maxsize=None)
def distillation_trainer(base: type) -> type:
    """Subclass a ``transformers.Trainer`` class so that its ``compute_loss`` is :func:`causal_lm_kd_loss`.

    ``distillation_trainer(transformers.Trainer)`` is :class:`DistillationTrainer`;
    ``distillation_trainer(trl.SFTTrainer)`` keeps TRL's dataset preparation, collator and
    logging and only replaces the loss. One class is built per ``base``.

    Args:
        base: ``transformers.Trainer`` or a subclass of it.

    Returns:
        a class named ``"Distillation" + base.__name__`` whose constructor takes ``base``'s arguments plus
        ``teacher_model`` and the keyword options of :func:`causal_lm_kd_loss` (``temperature``, ``alpha``,
        ``divergence``, ``beta``, ``topk``, ``topk_tail``, ``chunk_size``).

    Example:
        >>> from trl import SFTConfig, SFTTrainer
        >>> trainer = distillation_trainer(SFTTrainer)(model=student, teacher_model=teacher, args=SFTConfig(...),
        ...                                            train_dataset=data, processing_class=tokenizer, alpha=0.5)
        >>> trainer.train()
    """
    from transformers import Trainer

    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"base must be transformers.Trainer or a subclass of it, got {base!r}")

    class Distillation(base):
        __doc__ = (f"``{base.__module__}.{base.__name__}`` that trains ``model`` to match ``teacher_model`` "
                   "through :func:`causal_lm_kd_loss`; built by :func:`distillation_trainer`.")

        def __init__(self, *args, teacher_model, temperature: float = 1.0, alpha: float = 0.5,
                     divergence: str = "forward_kl", beta: float = 0.5, topk: Optional[int] = None,
                     topk_tail: str = "bucket", chunk_size: Optional[int] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.to(self.args.device).eval()
            self.kd_options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                                   topk=topk, topk_tail=topk_tail, chunk_size=chunk_size)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # With num_items_in_batch the loss is normalised over the whole accumulated batch, which is
            # what Trainer assumes (it then skips its division by the accumulation steps).
            loss = causal_lm_kd_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                     **self.kd_options)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # the count covers every process's tokens
            return (loss, {"loss": loss}) if return_outputs else loss

    Distillation.__name__ = Distillation.__qualname__ = "Distillation" + base.__name__
    return Distillation


def __getattr__(name):
    # DistillationTrainer subclasses transformers.Trainer, so it is built on first access.
    if name == "DistillationTrainer":
        from transformers import Trainer

        return distillation_trainer(Trainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
