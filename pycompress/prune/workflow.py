"""The prune -> fine-tune experiment: measurement (params, FLOPs, CPU latency, accuracy) and the
JSON/table report. The engine it drives (:func:`prune`, the schedules, :func:`induce_sparsity`,
:func:`choose_threshold`) lives in :mod:`pycompress.prune.pruner`; it is re-exported here.
"""

import copy
import json
import math
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from pycompress.prune.graph import _as_tuple, count_params_flops
from pycompress.prune.pruner import choose_threshold, induce_sparsity, prune  # re-exported: the old home
from pycompress.train import Trainer, evaluate_classifier

__all__ = ["prune", "induce_sparsity", "choose_threshold", "measure_latency", "compare_latency", "run_experiment",
           "format_report"]


# ---------------------------------------------------------------------------- measurement
@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                    repeats: int = 30, warmup: int = 5) -> Dict[str, float]:
    """Median CPU forward time (ms) per batch size, eval mode, ``torch.get_num_threads()`` threads."""
    return compare_latency({"model": model}, input_shape, batch_sizes, repeats, warmup)["model"]


@torch.inference_mode()
def compare_latency(models: Dict[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                    repeats: int = 30, warmup: int = 5) -> Dict[str, Dict[str, float]]:
    """Median forward times (ms) of several models, interleaved (A B A B ...) so machine noise hits all alike."""
    out = {name: {"threads": torch.get_num_threads()} for name in models}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_shape)
        times = {name: [] for name in models}
        modes = {name: m.training for name, m in models.items()}
        for m in models.values():
            m.eval()
        for r in range(warmup + repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(x)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t)
        for name, m in models.items():
            m.train(modes[name])
            out[name][f"batch{bs}_ms"] = 1e3 * statistics.median(times[name])
    return out


def train_cosine(model: nn.Module, train_data, val_data, *, epochs: int, lr: float, batch_size: int = 32,
                 seed: int = 0, checkpoint_path: Optional[str] = None, progress: bool = False,
                 resume: bool = False) -> None:
    """SGD (momentum 0.9, weight decay 1e-4) with a cosine schedule over ``epochs``, evaluated
    on ``val_data`` each epoch: the dense training and fine-tuning of the pruning workflows."""
    Trainer(model, train_data, eval_data=val_data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=1e-4,
            seed=seed, checkpoint_path=checkpoint_path, progress=progress,
            scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, epochs * math.ceil(len(train_data) / batch_size))).fit(resume=resume)


def _stage(model, example_inputs, test_data) -> dict:
    params, flops = count_params_flops(model, example_inputs)
    return {"params": params, "flops": flops, **({"accuracy": evaluate_classifier(model, test_data)["accuracy"]}
                                                  if test_data is not None else {})}


def run_experiment(model: nn.Module, example_inputs, train_data, val_data, test_data, *, dense_epochs: int = 0,
                   finetune_epochs: int = 0, dense_lr: float = 0.05, finetune_lr: float = 0.01, batch_size: int = 32,
                   seed: int = 0, checkpoint_dir: Optional[str] = None, resume: bool = False,
                   model_factory: Optional[Callable[[], nn.Module]] = None, latency_batch_sizes=(1, 32),
                   log: Optional[Callable[[str], None]] = None, progress: bool = False, **prune_kwargs) -> dict:
    """Dense training (optional) -> :func:`prune` -> fine-tuning, measured at each stage.

    With ``checkpoint_dir`` every phase checkpoints: ``dense.pt`` and
    ``finetune.pt`` (Trainer checkpoints) and ``pruned.pt`` (the pruned
    ``state_dict``); ``resume=True`` skips finished phases and continues
    interrupted ones (reloading the pruned model needs ``model_factory``).

    Returns:
        dict: ``{"config", "dense", "pruned", "fine_tuned", "history", "latency"}``; each
        stage holds params, FLOPs and test accuracy; ``latency`` holds interleaved
        median CPU times of the dense and final models.
    """
    import os

    from pycompress.prune.graph import load_pruned_state_dict
    from pycompress.train import atomic_save

    log = log or print
    example_inputs = _as_tuple(example_inputs)
    ck = (lambda name: os.path.join(checkpoint_dir, name)) if checkpoint_dir else (lambda name: None)
    torch.manual_seed(seed)
    if dense_epochs:
        train_cosine(model, train_data, val_data, epochs=dense_epochs, lr=dense_lr, batch_size=batch_size,
                     seed=seed, checkpoint_path=ck("dense.pt"), progress=progress, resume=resume)
    dense = _stage(model, example_inputs, test_data)
    log(f"dense: {dense}")
    history: list = []
    t0 = time.perf_counter()
    if resume and ck("pruned.pt") and os.path.exists(ck("pruned.pt")):
        if model_factory is None:
            raise ValueError("resume after pruning needs model_factory to rebuild the pruned model")
        saved = torch.load(ck("pruned.pt"), weights_only=True)
        pruned = load_pruned_state_dict(model_factory(), saved["state_dict"])
        history = saved["history"]
    else:
        pruned = prune(model, example_inputs, train_data=train_data, val_data=val_data, batch_size=batch_size,
                       seed=seed, history=history, log=log, **prune_kwargs)
        if ck("pruned.pt"):
            atomic_save({"state_dict": pruned.state_dict(), "history": history}, ck("pruned.pt"))
    prune_seconds = time.perf_counter() - t0
    after = _stage(pruned, example_inputs, test_data)
    log(f"pruned: {after}")
    final = copy.deepcopy(pruned)
    if finetune_epochs:
        train_cosine(final, train_data, val_data, epochs=finetune_epochs, lr=finetune_lr, batch_size=batch_size,
                     seed=seed + 1, checkpoint_path=ck("finetune.pt"), progress=progress, resume=resume)
    tuned = _stage(final, example_inputs, test_data)
    log(f"fine-tuned: {tuned}")
    shape = tuple(example_inputs[0].shape[1:])
    latency = compare_latency({"dense": model, "pruned": final}, shape, latency_batch_sizes)
    for stage, key in ((dense, "dense"), (after, "pruned"), (tuned, "pruned")):
        stage.update({k: v for k, v in latency[key].items()})
    config = {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v))
              for k, v in prune_kwargs.items()}
    config.update(dense_epochs=dense_epochs, finetune_epochs=finetune_epochs, dense_lr=dense_lr,
                  finetune_lr=finetune_lr, batch_size=batch_size, seed=seed)
    return {"config": config, "dense": dense, "pruned": after, "fine_tuned": tuned, "history": history,
            "prune_seconds": prune_seconds, "model": final}


def format_report(report: dict) -> str:
    """A plain-text table of the report's three stages."""
    rows = [("stage", "params", "FLOPs (MAC)", "accuracy", "latency b1 ms", "latency b32 ms")]
    dense = report["dense"]
    for key in ("dense", "pruned", "fine_tuned"):
        s = report[key]
        rows.append((key, f"{s['params']} ({dense['params'] / s['params']:.1f}x)",
                     f"{s['flops']} ({dense['flops'] / s['flops']:.1f}x)",
                     f"{100 * s['accuracy']:.2f}%" if "accuracy" in s else "-",
                     f"{s.get('batch1_ms', float('nan')):.3f}", f"{s.get('batch32_ms', float('nan')):.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    threads = dense.get("threads")
    return "\n".join(lines) + (f"\n(latency: median of interleaved runs, {threads} threads)" if threads else "")


def report_json(report: dict) -> str:
    """The report without the model object, as JSON."""
    return json.dumps({k: v for k, v in report.items() if k != "model"}, indent=2)
