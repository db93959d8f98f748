"""Distillation strategies: each turns teacher(s) into a ``step_fn`` for :class:`pycompress.train.Trainer`.

Every loss here is our fused :class:`pycompress.KDLoss`; a strategy only decides
which teacher logits, which rows and which KDLoss settings. The teacher is
frozen (eval mode, no gradient).

A strategy's life in a workflow:

1. ``teacher_logits(teachers, x)`` gives the logits it distils from (the
   ensemble combines several teachers here);
2. ``prepare(train_data, teacher_fn, seed)`` may change the training set
   (MUNGE grows and relabels it); the workflow may also cache the teacher's
   logits on every training example once, as a third batch element, when the
   data is fixed (no random augmentation);
3. ``step_fn(teacher_fn, cached)`` is the Trainer's ``step_fn(model, batch) -> loss``.
"""

import inspect
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pycompress.functional import DIVERGENCES
from pycompress.nn import KDLoss

__all__ = ["Strategy", "Hinton", "LogitRegression", "NoisyTeacher", "Munge", "Ensemble", "MehtaOzturk",
           "STRATEGIES", "make_strategy"]


def _check_float(name: str, value, low: float, high: float = math.inf, low_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if (value <= low if low_open else value < low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


class Strategy:
    """Base class. Subclasses set ``name`` and build ``self.loss`` (a KDLoss).

    Args:
        teachers_required (int): how many teachers the strategy uses (class attribute).
    """

    name = ""
    teachers_required = 1
    task = "classification"  # or "detection": which workflow of `pycompress distill` runs it

    def options(self) -> Dict[str, object]:
        """The hyperparameters, as passed to ``__init__`` (for reports and configs)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def teacher_logits(self, teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """The logits the student learns from: the first teacher's, by default."""
        return teachers[0](x)

    def prepare(self, train_data: Dataset, teacher_fn: Callable, seed: int) -> Dataset:
        """The training set the student sees; unchanged by default."""
        return train_data

    @staticmethod
    def _targets(batch, teacher_fn, cached):
        """``(x, y, t)``: the teacher runs on ``x`` unless its logits are cached as the third element."""
        x, y = batch[0], batch[1]
        if cached:
            return x, y, batch[2]
        with torch.no_grad():
            return x, y, teacher_fn(x)

    def step_fn(self, teacher_fn: Callable, cached: bool = False) -> Callable:
        """``step_fn(model, batch) -> loss``.

        Args:
            teacher_fn (callable): ``x -> teacher logits`` (see :meth:`teacher_logits`).
            cached (bool): batches are ``(x, y, teacher_logits)`` precomputed by the
                workflow; otherwise ``(x, y)`` and the teacher runs every step.
        """
        def step(model, batch):
            x, y, t = self._targets(batch, teacher_fn, cached)
            s = model(x)
            return self.loss(s, t.to(s.dtype), y)

        return step

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


class Hinton(Strategy):
    r"""Hinton, Vinyals & Dean (2015): soft targets at temperature T plus hard-label cross-entropy.

    .. math::
        L = \alpha \, T^2 \, \mathrm{KL}(p_t^T \,\|\, p_s^T) + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s))

    Args:
        temperature (float): T > 0; the paper uses 2-5.
        alpha (float): weight of the soft term in [0, 1]; the paper's seed is 0.5.
    """

    name = "hinton"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        self.temperature, self.alpha = temperature, alpha
        self.loss = KDLoss(temperature=temperature, alpha=alpha, divergence="forward_kl")


class LogitRegression(Strategy):
    r"""Ba & Caruana (2014): the student regresses the teacher's logits with L2, no softmax, no temperature.

    .. math::
        L = \alpha \, \frac{1}{2N} \sum_i \lVert s_i - t_i \rVert^2 + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s))

    Args:
        alpha (float): weight of the regression term; 1 (the paper) ignores the labels.
    """

    name = "logits"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha
        self.loss = KDLoss(alpha=alpha, divergence="mse_logits")


class NoisyTeacher(Strategy):
    r"""Sau & Balasubramanian (2016): L2 logit regression on a teacher perturbed for a fraction of each batch.

    Each step picks ``k = round(fraction * N)`` rows of the batch uniformly at
    random; their teacher logits become :math:`\tilde t = (1 + \xi)\, t`,
    :math:`\xi \sim \mathcal N(0, \sigma^2)` per element (``KDLoss(teacher_noise=sigma)``);
    the other rows keep :math:`t`. The loss is the batch mean over all N rows:

    .. math::
        L = \frac{1}{N} \Big( \sum_{i \in \text{noisy}} \ell(s_i, \tilde t_i)
            + \sum_{i \notin \text{noisy}} \ell(s_i, t_i) \Big), \quad
        \ell(s, t) = \alpha \, \tfrac12 \lVert s - t \rVert^2 + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s))

    computed as two KDLoss calls with ``reduction="sum"``. The rows and the noise
    come from torch's global RNG, which the Trainer seeds and checkpoints, so
    runs and resumed runs are reproducible.

    Args:
        sigma (float): noise standard deviation, >= 0.
        fraction (float): share of each batch that sees the noisy teacher, in [0, 1].
        alpha (float): weight of the regression term; 1 ignores the labels.
    """

    name = "noisy_teacher"

    def __init__(self, sigma: float = 0.2, fraction: float = 0.5, alpha: float = 1.0):
        _check_float("fraction", fraction, 0.0, 1.0)
        self.sigma, self.fraction, self.alpha = sigma, fraction, alpha
        self.noisy_loss = KDLoss(alpha=alpha, divergence="mse_logits", reduction="sum", teacher_noise=sigma)
        self.loss = KDLoss(alpha=alpha, divergence="mse_logits", reduction="sum")

    def step_fn(self, teacher_fn: Callable, cached: bool = False) -> Callable:
        def step(model, batch):
            x, y, t = self._targets(batch, teacher_fn, cached)
            s = model(x)
            t = t.to(s.dtype)
            n = s.shape[0]
            k = round(self.fraction * n)
            order = torch.randperm(n, device=s.device)
            noisy, clean = order[:k], order[k:]
            total = s.new_zeros(())
            if k > 0:
                total = total + self.noisy_loss(s[noisy], t[noisy], y[noisy])
            if k < n:
                total = total + self.loss(s[clean], t[clean], y[clean])
            return total / n

        return step


class Ensemble(Strategy):
    r"""Hinton-style distillation from several teachers averaged in probability space.

    At temperature T the target distribution is the mean of the teachers' tempered
    softmaxes, :math:`\bar p^T = \frac1K \sum_k \mathrm{softmax}(t_k / T)`. It is handed to
    KDLoss as the logits :math:`\bar t = T \log \bar p^T` (computed with a stable
    logsumexp), for which :math:`\mathrm{softmax}(\bar t / T) = \bar p^T` exactly:

    .. math::
        L = \alpha \, T^2 \, \mathrm{KL}(\bar p^T \,\|\, p_s^T) + (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(s))

    Args:
        temperature (float): T > 0.
        alpha (float): weight of the soft term in [0, 1].
    """

    name = "ensemble"
    teachers_required = 2

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        self.temperature, self.alpha = temperature, alpha
        self.loss = KDLoss(temperature=temperature, alpha=alpha, divergence="forward_kl")

    def teacher_logits(self, teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        log_p = torch.stack([torch.log_softmax(t(x).float() / T, dim=-1) for t in teachers])
        return T * (torch.logsumexp(log_p, dim=0) - math.log(len(teachers)))


class Munge(Strategy):
    r"""Buciluǎ, Caruana & Niculescu-Mizil (2006): train on the data plus a teacher-labelled transfer set.

    ``prepare`` grows a transfer set of ``round(transfer_factor * len(train))``
    synthetic inputs with a generator (:func:`pycompress.distill.munge.munge` for
    flat features; :func:`pycompress.distill.munge.noise_mixup` for images), labels
    the training inputs and the transfer set with the teacher's logits, and the
    student learns the teacher's outputs on the union (labels are not used, as in
    the paper; ``transfer_factor=0`` is the same training on the labelled data alone):

    .. math::
        L = T^2 \, D\big(\mathrm{softmax}(t/T), \mathrm{softmax}(s/T)\big), \quad
        x \in \text{train} \cup \text{transfer}

    Args:
        transfer_factor (float): transfer-set size as a multiple of the training set, >= 0.
        generator (str): ``auto`` (``mixup`` for inputs with >= 2 dims per example,
            ``munge`` for flat vectors), ``munge`` (on the flattened input) or ``mixup``.
        p (float): MUNGE swap probability per attribute.
        s (float): MUNGE noise scale: the noise std is ``|a - b| / s``.
        noise_std (float): ``mixup`` Gaussian noise std (in input units).
        mix_alpha (float): ``mixup`` weights ``lam ~ Beta(mix_alpha, mix_alpha)``.
        temperature (float): T of the soft targets.
        divergence (str): KDLoss divergence; ``mse_logits`` regresses logits instead.
    """

    name = "munge"
    GENERATORS = ("auto", "munge", "mixup")

    def __init__(self, transfer_factor: float = 4.0, generator: str = "auto", p: float = 0.5, s: float = 10.0,
                 noise_std: float = 0.05, mix_alpha: float = 1.0, temperature: float = 1.0,
                 divergence: str = "forward_kl"):
        _check_float("transfer_factor", transfer_factor, 0.0)
        _check_float("p", p, 0.0, 1.0)
        _check_float("s", s, 0.0, low_open=True)
        _check_float("noise_std", noise_std, 0.0)
        _check_float("mix_alpha", mix_alpha, 0.0, low_open=True)
        if generator not in self.GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(self.GENERATORS)}, got {generator!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        self.transfer_factor, self.generator, self.p, self.s = transfer_factor, generator, p, s
        self.noise_std, self.mix_alpha = noise_std, mix_alpha
        self.temperature, self.divergence = temperature, divergence
        self.loss = KDLoss(temperature=temperature, alpha=1.0, divergence=divergence)

    def prepare(self, train_data: Dataset, teacher_fn: Callable, seed: int) -> Dataset:
        from pycompress.distill.munge import label_with_teacher, make_transfer_set, stack_inputs

        x = stack_inputs(train_data)
        size = round(self.transfer_factor * len(x))
        g = torch.Generator().manual_seed(seed)
        kind = self.generator
        if kind == "auto":
            kind = "mixup" if x.dim() > 2 else "munge"
        transfer = make_transfer_set(x, size, kind, p=self.p, s=self.s, noise_std=self.noise_std,
                                     mix_alpha=self.mix_alpha, generator=g)
        union = torch.cat([x, transfer]) if size > 0 else x
        self.generator_used = kind
        return TensorDataset(union, label_with_teacher(teacher_fn, union))

    def step_fn(self, teacher_fn: Callable, cached: bool = False) -> Callable:
        def step(model, batch):
            x, t = batch  # prepare() made (x, teacher_logits): the union carries no labels
            s = model(x)
            return self.loss(s, t.to(s.dtype))

        return step


class MehtaOzturk(Strategy):
    r"""Mehta & Ozturk (2018), "Object detection at 200 frames per second": a YOLO student learns
    the ground truth and the teacher's last map, FM-NMS-ed, with the teacher's objectness
    scaling its class and box terms; unlabeled images get only the teacher terms.

    The loss is :func:`pycompress.functional.detection_distill_loss` (docs/yolo_loss.md).
    A detection strategy: its step works on detection batches ``(images, boxes, labels,
    labeled, index)`` (see :mod:`pycompress.detection.distill`).

    Args:
        fm_nms (bool): FM-NMS (K = 3) on the teacher's map.
        objectness_scaling (bool): weight the teacher's class and box terms by its objectness.
        suppress_objectness (bool): FM-NMS also zeroes the suppressed candidates' objectness.
        lambda_distill (float): weight of the teacher terms, >= 0.
    """

    name = "mehta_ozturk"
    task = "detection"

    def __init__(self, fm_nms: bool = True, objectness_scaling: bool = True, suppress_objectness: bool = False,
                 lambda_distill: float = 1.0):
        from pycompress.functional import check_detection_loss_options

        check_detection_loss_options(fm_nms, objectness_scaling, suppress_objectness, lambda_distill, 1.0, 1.0,
                                     1.0, 1.0, "mean")
        self.fm_nms, self.objectness_scaling = fm_nms, objectness_scaling
        self.suppress_objectness, self.lambda_distill = suppress_objectness, float(lambda_distill)

    def loss_options(self) -> Dict[str, object]:
        """Keyword options of :func:`~pycompress.functional.detection_distill_loss`."""
        return self.options()

    def step_fn(self, teacher_fn: Callable, cached: bool = False) -> Callable:
        raise TypeError("mehta_ozturk is a detection strategy: it runs in pycompress.detection.distill, whose "
                        "step builds it with pycompress.detection.distill.distillation_step")


STRATEGIES: Dict[str, type] = {c.name: c for c in (Hinton, LogitRegression, NoisyTeacher, Munge, Ensemble,
                                                   MehtaOzturk)}


def make_strategy(strategy, options: Optional[dict] = None) -> Strategy:
    """A Strategy from a name in :data:`STRATEGIES` (plus keyword ``options``) or an instance.

    Raises:
        ValueError: unknown strategy name or option.
        TypeError: ``strategy`` is neither a name nor a Strategy.
    """
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError(f"options {sorted(options)} given with a ready Strategy instance {strategy!r}")
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a name ({', '.join(STRATEGIES)}) or a Strategy, "
                        f"got {type(strategy).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    allowed = allowed_options(strategy)
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for strategy {strategy!r}; allowed: {', '.join(allowed)}")
    return cls(**(options or {}))


def allowed_options(name: str) -> List[str]:
    """The option names strategy ``name`` accepts."""
    return [k for k in inspect.signature(STRATEGIES[name].__init__).parameters if k != "self"]
