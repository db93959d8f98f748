"""Training a detector: ``pycompress train-detector`` and its Python API.

:class:`~pycompress.config.TrainDetectorConfig` holds every setting; :func:`train_detector`
takes it whole, trains with the shared :class:`~pycompress.train.Trainer` (checkpoints,
bit-identical resume, torchrun DDP) and returns (and writes) a JSON report::

    from pycompress.config import TrainDetectorConfig, replace
    cfg = replace(TrainDetectorConfig(), detector={"model": "tiny_yolo"}, train={"epochs": 8}, output="tiny.json")
    report = train_detector(cfg)
    report["test"]["AP50"]

The data is any import path whose callable returns ``(train[, val[, test]])`` (or an
object with those attributes) of detection datasets whose items are
``(image, boxes, labels[, labeled])`` with padded targets (label ``-1`` = padding),
as :func:`pycompress.data.digit_detection_splits` does.
"""

import os
import platform
import subprocess
import time
from typing import Any, Dict, Optional

import torch

from pycompress.config import TrainDetectorConfig, to_dict

__all__ = ["train_detector", "detection_step"]


def detection_step(detector, criterion):
    """The Trainer step function of a detector: forward, encode the targets, loss.

    ``detector`` is the bare model (its ``encode_targets`` is used); the step's own
    ``model`` argument may be its DDP wrapper. ``step.images`` counts the images it has seen.
    """
    def step(model, batch):
        images, boxes, labels = batch[0], batch[1], batch[2]
        labeled = batch[3] if len(batch) > 3 else None
        step.images += len(images)
        return criterion(model(images), *detector.encode_targets(boxes, labels, labeled))
    step.images = 0
    return step


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def train_detector(cfg: TrainDetectorConfig, command: Optional[str] = None) -> Dict[str, Any]:
    """Builds the data and the detector, trains, evaluates on the test split, measures, reports.

    Args:
        cfg (TrainDetectorConfig): the whole run.
        command (str, optional): the command line, recorded in the report.

    Returns:
        dict: ``config``, ``command``, ``commit``, ``machine``, ``params``, ``macs`` (per image),
        ``train`` (seconds, images/s, steps, history), ``val`` / ``test`` (AP, AP50, AP75,
        per-class AP50), ``latency_ms`` (per batch size). Also written to ``cfg.output``.
    """
    from pycompress.cli.common import atomic_write_json, load_data
    from pycompress.cost import measure_cost, measure_latency
    from pycompress.detection.evaluate import evaluate
    from pycompress.models.detection import build_detector
    from pycompress.train import Trainer, atomic_save, init_distributed, resolve_device, seed_everything

    if not isinstance(cfg, TrainDetectorConfig):
        raise TypeError(f"cfg must be a TrainDetectorConfig, got {type(cfg).__name__}")
    seed = cfg.single_seed()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    init_distributed()
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs)
    seed_everything(seed)
    model = build_detector(cfg.detector.model, **cfg.detector.kwargs)
    if not all(hasattr(model, m) for m in ("postprocess", "encode_targets", "criterion")):
        raise TypeError(f"detector: {cfg.detector.model!r} built a {type(model).__name__} without postprocess / "
                        "encode_targets / criterion")
    criterion = model.criterion(**cfg.loss)
    eval_opts = dict(score_threshold=cfg.score_threshold, iou_threshold=cfg.iou_threshold,
                     max_detections=cfg.max_detections)
    eval_seconds = [0.0]

    def eval_fn(m, data):
        start = time.perf_counter()
        out = evaluate(m, data, **eval_opts)
        eval_seconds[0] += time.perf_counter() - start
        return {"val_AP": out["AP"], "val_AP50": out["AP50"]}

    checkpoint = os.path.join(cfg.checkpoint_dir, "train.pt") if cfg.checkpoint_dir else None
    step = detection_step(model, criterion)
    trainer = Trainer(
        model, train, cfg.train, step_fn=step,
        eval_data=val if (cfg.eval_every_epoch and val is not None) else None, eval_fn=eval_fn,
        device=resolve_device(cfg.device), seed=seed, checkpoint_path=checkpoint,
        checkpoint_every=cfg.checkpoint_every or None, progress=cfg.progress)
    start = time.perf_counter()
    history = trainer.fit(resume=cfg.resume)
    train_seconds = time.perf_counter() - start - eval_seconds[0]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    images_seen = step.images * world
    model = trainer.module
    example = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=trainer.device)
    cost = measure_cost(model, example)
    report = {
        "config": to_dict(cfg), "command": command, "commit": _git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "detector": type(model).__name__, "params": cost.params, "macs": cost.macs, "flops": cost.flops,
        "train": {"seconds": train_seconds, "eval_seconds": eval_seconds[0], "steps": trainer.step,
                  "images": images_seen,
                  "images_per_second": images_seen / train_seconds if images_seen else None,
                  "history": history},
        "val": evaluate(model, val, **eval_opts) if val is not None else None,
        "test": evaluate(model, test, **eval_opts) if test is not None else None,
    }
    if trainer.device.type == "cpu":
        report["latency_ms"] = measure_latency(model, tuple(example.shape[1:]), cfg.latency_batch_sizes)
    if trainer.is_main:
        if cfg.save_model:
            atomic_save(model.state_dict(), cfg.save_model)
        if cfg.output:
            atomic_write_json(report, cfg.output)
    return report
