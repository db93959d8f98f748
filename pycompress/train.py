"""The shared training loop: fine-tuning after pruning, and every distillation strategy.

One :class:`Trainer` runs a plain loop with a pluggable *step function*
``step_fn(model, batch) -> loss``. Cross-entropy on ``(x, y)`` is the default;
a distillation strategy plugs in a closure that also runs a (frozen) teacher::

    def kd_step(model, batch):
        x, y = batch
        with torch.no_grad():
            t = teacher(x)
        return kd_loss(model(x), t, y, temperature=4.0, alpha=0.5)

    Trainer(student, train_set, TrainConfig(epochs=5), step_fn=kd_step, eval_data=val_set).fit()

What it guarantees
------------------
- **Determinism.** ``seed`` seeds torch, numpy and Python's ``random`` at the
  start. The data order of epoch e is a permutation drawn from a private
  generator seeded with ``seed + e``, so it does not depend on how much global
  randomness the model consumed (dropout, noise).
- **Atomic checkpoints** (``checkpoint_path``): written to ``<path>.tmp`` then
  ``os.replace``-d, so an interruption never leaves a truncated file. They hold
  the model, optimizer, scheduler and grad-scaler states, the torch / numpy /
  Python RNG states, and the position (epoch, batch within the epoch, optimizer
  step). They are written at optimizer-step boundaries only (every
  ``checkpoint_every`` steps, at each epoch end, and when ``max_steps`` stops
  the run), so no half-accumulated gradient is ever lost.
- **Resume is bit-identical on CPU**: ``fit(resume=True)`` restores all of the
  above and skips the batches already consumed in the current epoch, giving the
  same parameters as an uninterrupted run.
- **Gradient accumulation** (``grad_accum``): the loss of each micro-batch is
  divided by ``grad_accum``; one optimizer step per ``grad_accum`` micro-batches
  (the last, shorter group of an epoch also steps).
- **Mixed precision** (``amp``): ``torch.autocast`` around the step
  function. Off by default. ``"bf16"`` works on CPU and CUDA;
  ``"fp16"`` only on CUDA, with a ``GradScaler``.
- **Schedulers**: the Trainer builds the one its config names
  (``scheduler="cosine"``), since only it knows the run's optimizer-step count.
- **Evaluation** after every epoch with ``eval_fn(model, eval_data)`` (default:
  accuracy and mean cross-entropy), logged to ``history`` and the progress bar.

Distributed training
--------------------
Under ``torchrun`` call :func:`init_distributed` before building the Trainer.
When a process group is initialised the Trainer wraps the model in
``DistributedDataParallel`` (``Trainer.module`` stays the bare model: it is
what gets evaluated and checkpointed), and :meth:`Trainer.epoch_batches`, the
one place data order is decided, takes this rank's shard with a
``DistributedSampler`` (same seed + epoch permutation as one process).
``batch_size`` is then the per-rank micro-batch: the global batch is
``batch_size * world_size``. Progress, logging and checkpoint writes happen
on rank 0 only (:attr:`Trainer.is_main`), with a barrier after each write.
"""

import math
import os
import pickle
import random
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from pycompress.config import TrainConfig, replace, to_dict

__all__ = ["Trainer", "TrainConfig", "fit", "evaluate_classifier", "seed_everything", "cross_entropy_step",
           "atomic_save", "collate", "make_optimizer", "is_main_process", "world_size", "resolve_device",
           "init_distributed"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cross_entropy_step(model: nn.Module, batch) -> torch.Tensor:
    """The default step function: ``F.cross_entropy(model(x), y)`` on a batch ``(x, y)``."""
    return F.cross_entropy(model(batch[0]), batch[1])


def seed_everything(seed: int):
    """Seeds torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def atomic_save(obj, path: str):
    """``torch.save`` to ``path + '.tmp'``, then ``os.replace``: readers never see a partial file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts as one dict of dotted keys (``train.lr``), lists as they are."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_file(path: str, what: str, **kwargs):
    """``torch.load(path, weights_only=True)`` whose failures name the file: a missing file is
    a FileNotFoundError, an empty, truncated or foreign one a ValueError saying ``what`` it is."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{what} {path!r} is truncated or not a torch.save file ({type(e).__name__}: {e})") from e


def collate(dataset: Dataset, idx: List[int]):
    """The batch of ``dataset``'s items ``idx`` (one gather per tensor for a TensorDataset)."""
    if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor
        i = torch.as_tensor(idx)
        return tuple(t[i] for t in dataset.tensors)
    return default_collate([dataset[i] for i in idx])


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (``sgd`` | ``adam`` | ``adamw``) over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The LR factor of step ``s``: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    warmup = min(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def is_main_process() -> bool:
    """True on the process that logs and writes (rank 0, or no process group)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """Processes in the current group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_device(device) -> torch.device:
    """``auto`` picks CUDA when available; under torchrun on CUDA, this rank's ``cuda:LOCAL_RANK``."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: Dataset, batch_size: int = 256) -> Dict[str, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``model`` on ``(x, y)`` data, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            x, y = _to(collate(data, list(range(start, min(start + batch_size, len(data))))), device)
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


class Trainer:
    """A deterministic, resumable training loop with a pluggable loss.

    Args:
        model (nn.Module): trained in place.
        train_data (Dataset): indexable data; batches are collated from its items.
        config (TrainConfig, optional): the recipe (epochs, max_steps, batch_size,
            optimizer, lr, momentum, weight_decay, grad_accum, amp, scheduler,
            clip_grad_norm, drop_last); default :class:`pycompress.config.TrainConfig`.
            Keyword arguments named like its fields replace them
            (``Trainer(m, d, epochs=3, lr=0.05)``).
        step_fn (callable): ``step_fn(model, batch) -> scalar loss``; default
            :func:`cross_entropy_step`.
        eval_data (Dataset, optional): evaluated after every epoch.
        eval_fn (callable): ``eval_fn(model, eval_data) -> dict``; default
            :func:`evaluate_classifier`.
        optimizer (str | callable, optional): a name overriding ``config.optimizer``, or
            ``optimizer(params) -> Optimizer`` (then ``lr``, ``momentum`` and
            ``weight_decay`` are the factory's business).
        scheduler (str | callable, optional): a name overriding ``config.scheduler``
            (``"cosine"`` anneals over this run's optimizer steps, counted here), or
            ``scheduler(optimizer) -> LRScheduler``; stepped after every optimizer step.
        device (str | torch.device): where to train.
        seed (int): seeds all RNGs and the data order.
        checkpoint_path (str, optional): where to write checkpoints.
        checkpoint_every (int, optional): also checkpoint every this many steps.
        run_config (Mapping, optional): what else determines the result (a workflow's
            settings, e.g. the distillation strategy's options). Checkpoints record it with
            ``seed`` and ``config`` (``max_steps`` aside); resuming under settings that differ
            is refused with each differing key, old and new.
        progress (bool): show a tqdm bar (on the main rank only).
        amp_dtype (torch.dtype, optional): deprecated spelling of ``amp``.

    Example:
        >>> t = Trainer(model, train_set, TrainConfig(epochs=3, lr=0.05), eval_data=val_set,
        ...             checkpoint_path="ckpt.pt", checkpoint_every=50)
        >>> history = t.fit(resume=True)   # picks up ckpt.pt if it exists
    """

    def __init__(self, model: nn.Module, train_data: Dataset, config: Optional[TrainConfig] = None, *,
                 step_fn: Optional[Callable] = None, eval_data: Optional[Dataset] = None,
                 eval_fn: Optional[Callable] = None, optimizer: Union[None, str, Callable] = None,
                 scheduler: Union[None, str, Callable] = None, device="cpu", seed: int = 0,
                 checkpoint_path: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 progress: bool = True, amp_dtype: Optional[torch.dtype] = None,
                 run_config: Optional[Mapping] = None, **recipe):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not hasattr(train_data, "__len__") or not hasattr(train_data, "__getitem__"):
            raise TypeError(f"train_data must be an indexable Dataset, got {type(train_data).__name__}")
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        cfg = _trainer_config(config, optimizer, scheduler, amp_dtype, recipe)
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
        self.device = torch.device(device)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' (amp_dtype=torch.float16) needs a CUDA device; use 'bf16' on CPU")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.config = cfg
        self.module = model.to(self.device)  # the bare model: evaluated and checkpointed
        self.model = _wrap_distributed(self.module, self.device)  # what the step function runs
        self.train_data, self.eval_data = train_data, eval_data
        self.step_fn = step_fn or cross_entropy_step
        self.eval_fn = eval_fn or evaluate_classifier
        self.epochs, self.max_steps, self.batch_size = cfg.epochs, cfg.max_steps, cfg.batch_size
        self.grad_accum, self.amp_dtype = cfg.grad_accum, AMP_DTYPES.get(cfg.amp)
        self.clip_grad_norm = cfg.clip_grad_norm or None
        self.seed, self.drop_last = seed, cfg.drop_last
        self.checkpoint_path, self.checkpoint_every, self.progress = checkpoint_path, checkpoint_every, progress
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer(params) if callable(optimizer) else make_optimizer(cfg, params)
        if callable(scheduler):
            self.scheduler = scheduler(self.optimizer)
        elif cfg.scheduler == "cosine":
            # over every epoch's steps, not max_steps: a run stopped early by max_steps and then
            # resumed without it follows the same schedule as one that never stopped
            epoch_steps = math.ceil(len(self.epoch_batches(0)) / self.grad_accum) * self.epochs
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, warmup_cosine(cfg.warmup_steps, epoch_steps))
        else:
            self.scheduler = None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        # position: `batch` micro-batches of epoch `epoch` are done; `step` optimizer steps in total
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: List[dict] = []
        # Everything that determines this run's result, recorded in checkpoints: a resume under
        # other settings would silently continue the old run. max_steps only says where to stop.
        recorded = {"seed": seed, "train": {k: v for k, v in to_dict(cfg).items() if k != "max_steps"}}
        if optimizer is not None and not isinstance(optimizer, str):
            recorded["train"]["optimizer"] = "custom"  # a callable's settings cannot be compared
        self.run_config = _flatten({**recorded, "run": dict(run_config or {})})

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (this rank's share of the data, ``max_steps`` included)."""
        total = math.ceil(len(self.epoch_batches(0)) / self.grad_accum) * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    # ------------------------------------------------------------------ ranks
    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints (rank 0, or no process group)."""
        return is_main_process()

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The micro-batches (lists of dataset indices) of ``epoch``: the one place data order is decided."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # DistributedSampler draws the same permutation as below, then takes this rank's shard
            sampler = DistributedSampler(self.train_data, seed=self.seed, drop_last=self.drop_last)
            sampler.set_epoch(epoch)
            perm = list(sampler)
        else:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(len(self.train_data), generator=g).tolist()
        end = len(perm) - len(perm) % self.batch_size if self.drop_last else len(perm)
        return [perm[i:i + self.batch_size] for i in range(0, end, self.batch_size)]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    # numpy's state as tensors and ints so torch.load(weights_only=True) accepts it
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]),
                              float(np_state[4])],
                    "python": random.getstate()},
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "config": self.run_config,
            "history": self.history,
        }

    def load_state_dict(self, state: dict):
        old, new = state["config"], self.run_config
        differing = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
                     for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
        if differing:
            raise ValueError(f"the checkpoint was written with other settings, so resuming would not reproduce "
                             f"the run (checkpoint -> now): {'; '.join(differing)}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.epoch, self.batch, self.step = (state["position"][k] for k in ("epoch", "batch", "step"))
        self.history = list(state["history"])

    def save_checkpoint(self, path: Optional[str] = None):
        """Writes the full training state atomically (main rank only)."""
        path = path or self.checkpoint_path
        if path is not None and self.is_main:
            atomic_save(self.state_dict(), path)
        if path is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank runs ahead of (or reads) a checkpoint still being written

    def load_checkpoint(self, path: Optional[str] = None):
        path = path or self.checkpoint_path
        self.load_state_dict(load_file(path, "checkpoint", map_location=self.device))

    # ------------------------------------------------------------------ loop
    def _done(self) -> bool:
        return self.epoch >= self.epochs or (self.max_steps is not None and self.step >= self.max_steps)

    def evaluate(self) -> Dict[str, float]:
        """Runs ``eval_fn`` on ``eval_data`` (empty dict without eval data)."""
        return self.eval_fn(self.module, self.eval_data) if self.eval_data is not None else {}

    def fit(self, resume: bool = False) -> List[dict]:
        """Trains until ``epochs`` or ``max_steps``; returns the per-epoch history.

        Args:
            resume (bool): continue from ``checkpoint_path`` if that file exists;
                otherwise start fresh.
        """
        if resume and self.checkpoint_path and os.path.exists(self.checkpoint_path):
            self.load_checkpoint()
        elif self.step == 0 and self.batch == 0 and self.epoch == 0:
            seed_everything(self.seed)
        from tqdm.auto import tqdm

        total = self.total_steps()
        bar = tqdm(total=total, initial=min(self.step, total), disable=not (self.progress and self.is_main),
                   desc="train", leave=False)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else _NullContext())
        self.model.train()
        try:
            while not self._done():
                batches = self.epoch_batches(self.epoch)
                while self.batch < len(batches) and not self._done():
                    # one optimizer step over up to grad_accum micro-batches
                    group = batches[self.batch:self.batch + self.grad_accum]
                    for idx in group:
                        batch = _to(collate(self.train_data, idx), self.device)
                        with autocast:
                            loss = self.step_fn(self.model, batch) / len(group)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"loss is {float(loss)} at step {self.step}")
                        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                    self._optimizer_step()
                    self.batch += len(group)
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()) * len(group):.4f}")
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                if self.batch >= len(batches):
                    self.epoch, self.batch = self.epoch + 1, 0
                    record = {"epoch": self.epoch, "step": self.step, **self.evaluate()}
                    self.history.append(record)
                    if self.is_main and self.progress:
                        bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in record.items()))
                    self.save_checkpoint()
            self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    def _optimizer_step(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


def _trainer_config(config, optimizer, scheduler, amp_dtype, recipe: dict) -> TrainConfig:
    """The Trainer's TrainConfig: ``config`` with the keyword fields and the older spellings applied, checked."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if amp_dtype is not None:
        if amp_dtype not in AMP_DTYPES.values():
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        warnings.warn("Trainer(amp_dtype=...) is deprecated; use amp='bf16' or 'fp16'", DeprecationWarning,
                      stacklevel=3)
        recipe["amp"] = next(k for k, v in AMP_DTYPES.items() if v == amp_dtype)
    if recipe.get("clip_grad_norm", 0) is None:  # the old spelling of "off"
        recipe["clip_grad_norm"] = 0.0
    for name, value in (("optimizer", optimizer), ("scheduler", scheduler)):
        if isinstance(value, str):
            recipe[name] = value
    cfg = replace(config or TrainConfig(), **recipe)
    for name in ("epochs", "batch_size", "grad_accum"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if cfg.max_steps is not None and (isinstance(cfg.max_steps, bool) or cfg.max_steps < 1):
        raise ValueError(f"max_steps must be None or an int >= 1, got {cfg.max_steps!r}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be a float > 0, got {cfg.lr!r}")
    return cfg


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def init_distributed() -> bool:
    """Joins the process group that ``torchrun`` describes in the environment, if any.

    Uses ``nccl`` when CUDA is available (and selects ``cuda:LOCAL_RANK``),
    ``gloo`` otherwise. Does nothing without ``WORLD_SIZE`` in the environment
    or when a group already exists.

    Returns:
        bool: True when this process is part of an initialised process group.
    """
    dist = torch.distributed
    if not dist.is_available():
        return False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_initialized()


def _wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fit(model: nn.Module, train_data: Dataset, resume: bool = False, config: Optional[TrainConfig] = None,
        **kwargs) -> List[dict]:
    """Functional form: ``Trainer(model, train_data, config, **kwargs).fit(resume)``."""
    return Trainer(model, train_data, config, **kwargs).fit(resume=resume)


def __getattr__(name):
    if name == "_collate":  # the old private name, imported by other modules before it became public
        warnings.warn("pycompress.train._collate is deprecated; use pycompress.train.collate", DeprecationWarning,
                      stacklevel=2)
        return collate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
