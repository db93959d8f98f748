"""The detector-distillation ablation of results/detection/distill/ (Mehta & Ozturk 2018).

Every run trains tiny_yolo the same way (same steps, recipe and seeds) on 1,000 labeled
digit canvases; only the loss and the training pool differ. One process, one thread, the
teacher cached once per call (the data has no random augmentation, so the cache is exact
up to fp16 storage). Writes one report per part and summary.md.

    python scripts/detection_distill_ablation.py --out results/detection/distill \\
        --teacher results/detection/yolo_teacher.pt --weak-teacher results/detection/distill/weak_teacher.pt
"""

import argparse
import json
import os
import statistics
import time

import torch

from pycompress.config import DistillConfig, replace
from pycompress.detection.distill import (TeacherCache, load_teacher, detection_splits, distill_detector,
                                          format_detection_table, training_pool)
from pycompress.distill.strategies import MehtaOzturk

# Chosen before any test score was seen: the recipe of results/detection (AdamW 3e-3, cosine,
# warm-up), far fewer steps (64) because the shared machine gave this job a fraction of a core.
# Every run gets about the same optimizer steps (a fixed compute budget): 2 epochs of the
# 1,000 labeled images, and 2 / (1 + ratio) epochs (at least 1) of a pool with unlabeled images.
DATA = {"dataset": "pycompress.data:digit_detection_splits",
        "kwargs": {"seed": 0, "num_images": {"train": 1000, "val": 500, "test": 1000, "unlabeled": 1000}}}
LABELED_EPOCHS = 2
TRAIN = {"batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
         "weight_decay": 5e-4, "scheduler": "cosine", "warmup_steps": 20, "clip_grad_norm": 10.0}
INGREDIENTS = {  # the loss variants without both ingredients, labeled data only
    "distill_plain": dict(fm_nms=False, objectness_scaling=False),
    "distill_fm_nms": dict(fm_nms=True, objectness_scaling=False),
    "distill_objectness_scaling": dict(fm_nms=False, objectness_scaling=True),
}


def config(args, teacher_path, teacher_kwargs, ratio, baseline, output):
    return replace(DistillConfig(), seeds=args.seeds, baseline=baseline, cache_teacher=True, progress=False,
                   output=output, checkpoint_dir=os.path.join(args.checkpoints, os.path.basename(output)[:-5]),
                   resume=args.resume, strategies=["mehta_ozturk"],
                   teacher={"model": "yolo_teacher", "kwargs": teacher_kwargs, "checkpoints": [teacher_path]},
                   student={"model": "tiny_yolo", "kwargs": {"width": 6}}, data=DATA,
                   train={**TRAIN, "epochs": max(1, round(LABELED_EPOCHS / (1 + ratio)))},
                   detection={"unlabeled_ratio": float(ratio), "num_threads": 1})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/detection/distill")
    parser.add_argument("--teacher", default="results/detection/yolo_teacher.pt")
    parser.add_argument("--weak-teacher", default="results/detection/distill/weak_teacher.pt")
    parser.add_argument("--weak-teacher-width", type=int, default=8)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[1])
    parser.add_argument("--checkpoints", default="/tmp/detection_distill_ablation")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--summary-only", action="store_true", help="summary.md from the part reports written so far")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    full = {"full": MehtaOzturk(fm_nms=True, objectness_scaling=True)}
    # in order of what the table needs most, each part written as soon as it ends
    parts = [("core", args.teacher, {"width": 16}, 0, True, full)]
    parts += [(f"unlabeled_{r:g}x", args.teacher, {"width": 16}, r, False, full) for r in args.ratios]
    parts += [("ingredients", args.teacher, {"width": 16}, 0, False,
               {label: MehtaOzturk(**o) for label, o in INGREDIENTS.items()})]
    parts += [("weak_teacher_distill", args.weak_teacher, {"width": args.weak_teacher_width}, 0, False, full)]
    if args.summary_only:
        names = [p[0] for p in parts if os.path.exists(os.path.join(args.out, f"{p[0]}.json"))]
        reports = {n: json.load(open(os.path.join(args.out, f"{n}.json"))) for n in names}
        reports = {n: r for n, r in reports.items() if "runs" in r}  # weak_teacher.json is the teacher's own
        return write_summary(args.out, reports)
    reports, caches = {}, {}
    # one cache per teacher, over the largest pool: every smaller pool starts with the same images
    largest = config(args, args.teacher, {"width": 16}, max(args.ratios), False, "largest.json")
    train, _, _, unlabeled = detection_splits(largest)
    pool_images = training_pool(train, unlabeled, max(args.ratios)).tensors[0]
    for name, teacher, kwargs, ratio, baseline, strategies in parts:
        output = os.path.join(args.out, f"{name}.json")
        cfg = config(args, teacher, kwargs, ratio, baseline, output)
        model = load_teacher(cfg, teacher).eval()
        if teacher not in caches:
            start = time.perf_counter()
            caches[teacher] = TeacherCache.build(model, pool_images)
            print(f"teacher cache of {teacher}: {len(pool_images)} images, {time.perf_counter() - start:.0f} s",
                  flush=True)
        reports[name] = distill_detector(cfg, strategies=strategies, teacher=model, cache=caches[teacher])
        print(name, flush=True)
        print(format_detection_table(reports[name]), flush=True)
    write_summary(args.out, reports)


def write_summary(out: str, reports: dict):
    summary = summarise(reports)
    with open(os.path.join(out, "summary.md.tmp"), "w") as f:
        f.write(summary)
    os.replace(os.path.join(out, "summary.md.tmp"), os.path.join(out, "summary.md"))
    print(summary)


def summarise(reports: dict) -> str:
    """One Markdown table of every run: val and test AP50 / AP, mean ± std over seeds, and the
    paired (same seed) test difference against the student alone of the core part."""
    base = reports["core"]["runs"]["student_alone"]["seeds"]

    def ms(values):
        mean = statistics.mean(values)
        return f"{mean:.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    rows = ["| part | run | teacher test AP50 | val AP50 | test AP50 | test AP | test AP50 - student alone "
            "(paired) | test AP - student alone (paired) | training images/s |", "|" + "---|" * 9]
    for part, rep in reports.items():
        teacher = f"{rep['teacher']['test']['AP50']:.3f}" if "teacher" in rep else ""
        for label, r in rep["runs"].items():
            seeds = sorted(r["seeds"])
            cell = {k: [r["seeds"][s]["test"][k] for s in seeds] for k in ("AP50", "AP")}
            diff = {k: [r["seeds"][s]["test"][k] - base[s]["test"][k] for s in seeds] for k in ("AP50", "AP")}
            paired = ("", "") if label == "student_alone" else (ms(diff["AP50"]), ms(diff["AP"]))
            rows.append(f"| {part} | {label} | {teacher} | {ms([r['seeds'][s]['val']['AP50'] for s in seeds])} | "
                        f"{ms(cell['AP50'])} | {ms(cell['AP'])} | {paired[0]} | {paired[1]} | "
                        f"{r['images_per_second']:.0f} |")
    return "\n".join(rows) + "\n"

if __name__ == "__main__":
    main()
