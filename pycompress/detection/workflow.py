"""Training a detector: ``pycompress train-detector`` and its Python API.

One dataclass, :class:`DetectionTrainConfig`, holds every setting; :func:`train_detector`
takes it whole, trains with the shared :class:`~pycompress.train.Trainer` (checkpoints,
bit-identical resume, torchrun DDP) and returns (and writes) a JSON report::

    from pycompress.detection.workflow import DetectionTrainConfig, train_detector
    report = train_detector(DetectionTrainConfig(detector="tiny_yolo", epochs=8, output="tiny.json"))
    report["test"]["AP50"]

The data is any import path whose callable returns ``(train[, val[, test]])`` (or an
object with those attributes) of detection datasets whose items are
``(image, boxes, labels[, labeled])`` with padded targets (label ``-1`` = padding),
as :func:`pycompress.data.digit_detection_splits` does.
"""

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["DetectionTrainConfig", "train_detector", "load_detection_config", "detection_step"]


@dataclass
class DetectionTrainConfig:
    """Every setting of a detector training run (``--set key=value`` names these fields)."""

    detector: str = "yolo_teacher"           # a registered name (pycompress.models.detection) or 'module:factory'
    detector_kwargs: Dict[str, Any] = field(default_factory=dict)
    dataset: str = "pycompress.data:digit_detection_splits"
    dataset_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss: Dict[str, Any] = field(default_factory=dict)  # options of the detector's criterion (lambda_obj, ...)
    epochs: int = 10
    max_steps: int = 0                       # stop after this many steps (0: none); the schedule spans the epochs
    batch_size: int = 32
    lr: float = 2e-3                         # AdamW, linear warm-up then cosine decay to zero
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    clip_grad_norm: float = 10.0             # 0 disables clipping
    eval_every_epoch: bool = True            # val AP50 after each epoch (in the history)
    score_threshold: float = 0.01            # evaluation postprocess
    iou_threshold: float = 0.5
    max_detections: int = 100
    latency_batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0                     # torch.set_num_threads (0: leave torch's default); 1 is faster on a busy machine
    output: str = "detector_report.json"     # the JSON report ('' for none)
    save_model: str = ""                     # the trained state_dict ('' for none)
    checkpoint_dir: str = ""                 # resumable Trainer checkpoint here ('' for none)
    checkpoint_every: int = 0                # also checkpoint every N steps (0: epoch ends only)
    resume: bool = False
    progress: bool = True


def load_detection_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DetectionTrainConfig:
    """Reads a TOML/YAML file (if given), applies ``key=value`` overrides, validates every key."""
    from pycompress.distill.config import _build, apply_overrides, read_config_file

    data = read_config_file(path) if path else {}
    return _build(DetectionTrainConfig, apply_overrides(data, overrides), "")


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


def _write_json(obj, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _validate(cfg: DetectionTrainConfig):
    if not isinstance(cfg, DetectionTrainConfig):
        raise TypeError(f"cfg must be a DetectionTrainConfig, got {type(cfg).__name__}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "checkpoint_every", "num_threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("resume needs checkpoint_dir")


def train_detector(cfg: DetectionTrainConfig, command: Optional[str] = None) -> Dict[str, Any]:
    """Builds the data and the detector, trains, evaluates on the test split, measures, reports.

    Args:
        cfg (DetectionTrainConfig): the whole run.
        command (str, optional): the command line, recorded in the report.

    Returns:
        dict: ``config``, ``command``, ``commit``, ``machine``, ``params``, ``macs`` (per image),
        ``train`` (seconds, images/s, steps, history), ``val`` / ``test`` (AP, AP50, AP75,
        per-class AP50), ``latency_ms`` (per batch size). Also written to ``cfg.output``.
    """
    from pycompress.detection.evaluate import evaluate
    from pycompress.distill.imports import load_data
    from pycompress.models.detection import build_detector
    from pycompress.prune.graph import count_params_flops
    from pycompress.prune.workflow import measure_latency
    from pycompress.train import Trainer, atomic_save, init_distributed, seed_everything

    _validate(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    init_distributed()
    train, val, test = load_data(cfg.dataset, cfg.dataset_kwargs)
    seed_everything(cfg.seed)
    model = build_detector(cfg.detector, **cfg.detector_kwargs)
    if not all(hasattr(model, m) for m in ("postprocess", "encode_targets", "criterion")):
        raise TypeError(f"detector: {cfg.detector!r} built a {type(model).__name__} without postprocess / "
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

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs  # max_steps only stops early: a resumed run continues this schedule
    warmup = min(cfg.warmup_steps, total_steps)

    def lr_lambda(step):  # linear warm-up, then cosine to zero at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    checkpoint = os.path.join(cfg.checkpoint_dir, "train.pt") if cfg.checkpoint_dir else None
    step = detection_step(model, criterion)
    trainer = Trainer(
        model, train, step_fn=step,
        eval_data=val if (cfg.eval_every_epoch and val is not None) else None, eval_fn=eval_fn,
        epochs=cfg.epochs, max_steps=cfg.max_steps or None, batch_size=cfg.batch_size,
        optimizer=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        clip_grad_norm=cfg.clip_grad_norm or None, device=cfg.device, seed=cfg.seed, checkpoint_path=checkpoint,
        checkpoint_every=cfg.checkpoint_every or None, progress=cfg.progress)
    start = time.perf_counter()
    history = trainer.fit(resume=cfg.resume)
    train_seconds = time.perf_counter() - start - eval_seconds[0]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    images_seen = step.images * world
    model = trainer.module
    example = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=trainer.device)
    params, macs = count_params_flops(model, example)
    report = {
        "config": dataclasses.asdict(cfg), "command": command, "commit": _git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "detector": type(model).__name__, "params": params, "macs": macs,
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
            _write_json(report, cfg.output)
    return report
