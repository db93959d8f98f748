"""Detector distillation (Mehta & Ozturk 2018): the detection side of ``pycompress distill``.

:func:`distill_detector` takes a :class:`~pycompress.config.DistillConfig` whose strategies are
detection strategies (``mehta_ozturk``); per seed it trains the student alone (the YOLO loss on
the labeled set) and one student per strategy on the labeled set plus
``detection.unlabeled_ratio`` times as many unlabeled images, all on the shared
:class:`~pycompress.train.Trainer` (checkpoints, bit-identical resume, torchrun DDP), then
reports val and test COCO AP / AP50 per run, mean ± std over seeds and the paired difference
against the student alone.

The teacher's cost: with ``cache_teacher`` (the default) the teacher runs once over the pool
and :class:`TeacherCache` keeps its raw map (fp16 by default) and its FM-NMS keep mask;
otherwise it runs on every step. The cache is exact when the images are the same every epoch
(no random augmentation), as in the digit-detection data; docs/detection_distill.md bounds the
fp16 error.
"""

import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pycompress.config import DistillConfig, result_settings, to_dict

__all__ = ["TeacherCache", "distillation_step", "distill_detector", "training_pool", "detection_splits",
           "load_teacher", "format_detection_table"]


@dataclass
class TeacherCache:
    """The teacher's outputs on every image of the training pool, computed once.

    Attributes:
        raw (Tensor[N, A, 5 + C, H, W]): the teacher's raw map, in the cache dtype.
        keep (BoolTensor[N, A, H, W]): its FM-NMS keep mask (K = 3), from the fp32 map.
    """

    raw: torch.Tensor
    keep: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, images: torch.Tensor, dtype: torch.dtype = torch.float16,
              batch_size: int = 128) -> "TeacherCache":
        """Runs ``teacher`` (eval mode) over ``images`` (N, 3, S, S) in batches."""
        from pycompress.functional import teacher_fm_nms_keep

        device = next(teacher.parameters()).device
        raws, keeps = [], []
        for start in range(0, len(images), batch_size):
            raw = teacher(images[start:start + batch_size].to(device)).float()
            keeps.append(teacher_fm_nms_keep(raw).cpu())
            raws.append(raw.to(dtype).cpu())
        return cls(torch.cat(raws), torch.cat(keeps))

    def lookup(self, index: torch.Tensor, dtype: torch.dtype, device) -> tuple:
        """``(raw, keep)`` of the images at ``index``, the map in the student's ``dtype``."""
        index = index.cpu()
        return self.raw[index].to(device=device, dtype=dtype), self.keep[index].to(device)


def training_pool(labeled, unlabeled, unlabeled_ratio: float) -> TensorDataset:
    """``(images, boxes, labels, labeled, index)``: the labeled split, then the first
    ``round(unlabeled_ratio * len(labeled))`` unlabeled images (``labeled = False``).

    ``index`` numbers the pool's images, for :class:`TeacherCache` look-ups.
    """
    images, boxes, labels, flags = (t for t in labeled.tensors)
    n_unlabeled = int(round(unlabeled_ratio * len(images)))
    if n_unlabeled:
        if unlabeled is None:
            raise ValueError("detection.unlabeled_ratio > 0 needs data with an 'unlabeled' split")
        if n_unlabeled > len(unlabeled):
            raise ValueError(f"detection.unlabeled_ratio = {unlabeled_ratio} asks for {n_unlabeled} unlabeled "
                             f"images; the unlabeled split has {len(unlabeled)} (raise its num_images)")
        u_images, u_boxes, u_labels, _ = unlabeled.tensors
        images = torch.cat([images, u_images[:n_unlabeled]])
        boxes = torch.cat([boxes, u_boxes[:n_unlabeled].new_zeros((n_unlabeled,) + boxes.shape[1:])])
        labels = torch.cat([labels, labels.new_full((n_unlabeled,) + labels.shape[1:], -1)])
        flags = torch.cat([flags, torch.zeros(n_unlabeled, dtype=torch.bool)])
    return TensorDataset(images, boxes, labels, flags, torch.arange(len(images)))


def distillation_step(student: nn.Module, strategy=None, teacher: Optional[nn.Module] = None,
                      cache: Optional[TeacherCache] = None) -> Callable:
    """The Trainer step of a YOLO student: its loss, with the teacher terms of ``strategy``.

    Args:
        student (nn.Module): the bare detector (its ``anchors`` and ``encode_targets``); the
            step's ``model`` argument may be its DDP wrapper.
        strategy (MehtaOzturk, optional): None trains the student alone (the YOLO loss).
        teacher (nn.Module, optional): run on every step (frozen, eval mode) when there is no cache.
        cache (TeacherCache, optional): the teacher's outputs, looked up by the batch's ``index``.

    Batches are ``(images, boxes, labels, labeled, index)`` of :func:`training_pool`.
    ``step.images`` counts the images seen.
    """
    from pycompress.functional import detection_distill_loss, teacher_fm_nms_keep

    if strategy is not None and teacher is None and cache is None:
        raise ValueError("a distillation step needs the teacher or its cache")
    options = strategy.loss_options() if strategy is not None else {}

    def step(model, batch):
        images, boxes, labels, labeled, index = batch
        step.images += len(images)
        raw = model(images)
        cls, box, labeled = student.encode_targets(boxes, labels, labeled)
        if strategy is None:
            return detection_distill_loss(raw, None, student.anchors, cls, box, labeled)
        if cache is not None:
            teacher_raw, keep = cache.lookup(index, raw.dtype, raw.device)
        else:
            with torch.no_grad():
                teacher_raw = teacher(images).to(raw.dtype)
            keep = teacher_fm_nms_keep(teacher_raw) if options["fm_nms"] else None
        return detection_distill_loss(raw, teacher_raw, student.anchors, cls, box, labeled, teacher_keep=keep,
                                      **options)

    step.images = 0
    return step


def detection_splits(cfg: DistillConfig):
    """train, val, test and unlabeled of ``cfg.data`` (the factory's attributes, or a tuple of four)."""
    from pycompress.cli.common import load_object

    out = load_object(cfg.data.dataset, "data.dataset")(**cfg.data.kwargs)
    if isinstance(out, (tuple, list)):
        out = tuple(out) + (None,) * (4 - len(out))
        return out[:4]
    return tuple(getattr(out, name, None) for name in ("train", "val", "test", "unlabeled"))


def load_teacher(cfg: DistillConfig, path: str) -> nn.Module:
    """The detector ``cfg.teacher`` names, with the state_dict at ``path``."""
    from pycompress.distill.workflow import load_state_dict
    from pycompress.models.detection import build_detector

    return load_state_dict(build_detector(cfg.teacher.model, **cfg.teacher.kwargs), path)


def _summary(values: List[float]) -> dict:
    return {"values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def distill_detector(cfg: DistillConfig, strategies: Optional[Dict[str, object]] = None,
                     teacher: Optional[nn.Module] = None, cache: Optional[TeacherCache] = None,
                     splits: Optional[tuple] = None, evaluate_teacher: bool = True) -> dict:
    """Trains the student alone and with each detection strategy, over ``cfg.seeds``; one report.

    Args:
        cfg (DistillConfig): student / teacher / data, ``train`` (the student's recipe, the same
            for every run), ``cache_teacher``, ``baseline``, ``checkpoint_dir`` / ``resume``, the
            strategies and their options, and the ``detection`` section.
        strategies (dict, optional): ``label -> MehtaOzturk`` instead of ``cfg.strategies``
            (an ablation's variants of one strategy).
        teacher (nn.Module, optional): a trained teacher instead of ``cfg.teacher.checkpoints[0]``.
        cache (TeacherCache, optional): this teacher's cache over this pool, or over a larger pool of
            the same data (pools of a higher ``unlabeled_ratio`` start with the same images); built
            here when ``cache_teacher`` and not given. The report's ``teacher_cache`` is the cache used.
        splits (tuple, optional): ``(train, val, test, unlabeled)`` instead of generating ``cfg.data``
            again (an ablation's many calls share one data set); a split may be None (no test
            split: the runs are scored on val only).
        evaluate_teacher (bool): score the teacher on val and test in the report (an ablation that
            calls this once per run scores it once itself).

    Returns:
        dict: ``config``, ``teacher`` (params, val / test AP), ``runs``: label -> ``options``,
        ``val`` / ``test`` -> ``AP`` / ``AP50`` summaries over seeds, ``paired_test_AP50`` /
        ``paired_test_AP`` (per-seed differences against the student alone), ``images_per_second``.
        Also written to ``cfg.output``.
    """
    from pycompress.cli.common import atomic_write_json
    from pycompress.detection.evaluate import evaluate
    from pycompress.distill.strategies import make_strategy
    from pycompress.models.detection import build_detector
    from pycompress.train import Trainer, init_distributed, is_main_process, resolve_device, seed_everything

    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    det = cfg.detection
    if det.num_threads:
        torch.set_num_threads(det.num_threads)
    init_distributed()
    if strategies is None:
        strategies = {name: make_strategy(name, cfg.strategy.get(name)) for name in cfg.strategies}
    for label, s in strategies.items():
        if getattr(s, "task", None) != "detection":
            raise ValueError(f"strategy {label!r} is not a detection strategy (e.g. mehta_ozturk)")
    if teacher is None and strategies:
        if not cfg.teacher.checkpoints:
            raise ValueError("missing teacher: set teacher.checkpoints or pass --teacher-checkpoint (train one "
                             "with `pycompress train-detector --save-model teacher.pt`)")
        teacher = load_teacher(cfg, cfg.teacher.checkpoints[0])
    if splits is not None and (not isinstance(splits, (tuple, list)) or len(splits) != 4):
        raise ValueError("splits must be a tuple (train, val, test, unlabeled)")
    device = resolve_device(cfg.device)
    train, val, test, unlabeled = detection_splits(cfg) if splits is None else splits
    eval_opts = dict(score_threshold=det.score_threshold, iou_threshold=det.iou_threshold,
                     max_detections=det.max_detections)

    def scores(model) -> dict:
        return {name: {k: evaluate(model, split, **eval_opts)[k] for k in ("AP", "AP50")}
                for name, split in (("val", val), ("test", test)) if split is not None}

    labeled_pool = training_pool(train, None, 0.0)
    pool = training_pool(train, unlabeled, det.unlabeled_ratio) if strategies else labeled_pool
    report = {"config": to_dict(cfg), "seeds": list(cfg.seeds), "labeled_images": len(labeled_pool),
              "unlabeled_images": len(pool) - len(labeled_pool), "runs": {}}
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        report["teacher"] = {"params": sum(p.numel() for p in teacher.parameters()),
                             **(scores(teacher) if evaluate_teacher else {})}
    if not (cfg.cache_teacher and strategies):
        cache = None
    elif cache is None:
        start = time.perf_counter()
        cache = TeacherCache.build(teacher, pool.tensors[0], getattr(torch, det.teacher_cache_dtype))
        report["teacher_cache_seconds"] = time.perf_counter() - start
    elif len(cache.raw) < len(pool):
        raise ValueError(f"cache holds {len(cache.raw)} images, the training pool {len(pool)}")
    if cache is not None:
        report["teacher_cache"] = {"dtype": str(cache.raw.dtype).replace("torch.", ""), "images": len(cache.raw),
                                   "bytes": cache.raw.numel() * cache.raw.element_size() + cache.keep.numel()}

    # What a checkpoint must match to be resumed besides the recipe: the student alone depends on
    # the student and the data only, a distilled student also on its teacher, pool and loss options.
    settings = result_settings(cfg, "train", "strategies", "strategy", "baseline")
    alone_settings = {k: settings[k] for k in ("device", "student", "data")}
    runs = ([("student_alone", None, labeled_pool)] if cfg.baseline else []) + \
        [(label, s, pool) for label, s in strategies.items()]
    for label, strategy, data in runs:
        entry = {"strategy": getattr(strategy, "name", None),
                 "options": strategy.options() if strategy is not None else {}, "seeds": {}}
        seconds, images = 0.0, 0
        for seed in cfg.seeds:
            seed_everything(seed)
            model = build_detector(cfg.student.model, **cfg.student.kwargs)
            step = distillation_step(model, strategy, teacher, cache)
            ckpt = (os.path.join(cfg.checkpoint_dir, f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}_seed{seed}.pt")
                    if cfg.checkpoint_dir else None)
            run_config = (alone_settings if strategy is None else
                          {**settings, "label": label, "options": strategy.options()})
            trainer = Trainer(model, data, cfg.train, step_fn=step, device=device, seed=seed,
                              checkpoint_path=ckpt, progress=cfg.progress, run_config=run_config)
            start = time.perf_counter()
            trainer.fit(resume=cfg.resume)
            seconds += time.perf_counter() - start
            images += step.images
            entry["seeds"][str(seed)] = scores(trainer.module)
        for split in ("val", "test"):
            if split in entry["seeds"][str(cfg.seeds[0])]:
                entry[split] = {k: _summary([entry["seeds"][str(s)][split][k] for s in cfg.seeds])
                                for k in ("AP", "AP50")}
        entry["images_per_second"] = images / seconds if images and seconds else None
        report["runs"][label] = entry
        if label != "student_alone" and "student_alone" in report["runs"] and "test" in entry:
            base = report["runs"]["student_alone"]["seeds"]
            for k in ("AP50", "AP"):
                entry[f"paired_test_{k}"] = _summary([entry["seeds"][str(s)]["test"][k] - base[str(s)]["test"][k]
                                                      for s in cfg.seeds])
    if is_main_process():
        if cfg.output:
            atomic_write_json(report, cfg.output)
        if cfg.progress:
            print(format_detection_table(report))
    return report


def format_detection_table(report: dict) -> str:
    """A Markdown table of a :func:`distill_detector` report: test AP50 and AP, mean ± std, paired difference."""
    from pycompress.cli.common import format_table

    def ms(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if s else ""

    rows = []
    if "teacher" in report and "test" in report["teacher"]:
        t = report["teacher"]["test"]
        rows.append(("teacher", f"{t['AP50']:.3f}", f"{t['AP']:.3f}", "", ""))
    for label, r in report["runs"].items():
        test = r.get("test", {})
        rows.append((label, ms(test.get("AP50")), ms(test.get("AP")), ms(r.get("paired_test_AP50")),
                     ms(r.get("paired_test_AP"))))
    head = ("run", "test AP50", "test AP", "AP50 vs student alone", "AP vs student alone")
    return format_table(head, rows, markdown=True)

