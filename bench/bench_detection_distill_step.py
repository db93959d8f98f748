"""Benchmark: one whole detector-distillation training step, in images/s.

Run explicitly (pyproject disables benchmarks and only collects tests/):

    python -m pytest bench/bench_detection_distill_step.py --benchmark-enable -q -s

One optimizer step (forward, target encoding, loss, backward, AdamW) of ``tiny_yolo``
(width 6) on a batch of 32 digit-detection canvases (64 x 64), three ways, timed
interleaved (A B C A B C ...) in one process:

* student alone: the YOLO loss (the fused op without a teacher);
* teacher every step: ``yolo_teacher`` (width 16) forward, FM-NMS, then the fused
  Mehta & Ozturk loss (FM-NMS and objectness scaling on);
* teacher cache: the same loss from a :class:`~pycompress.detection.distill.TeacherCache`
  (fp16 map and keep mask) looked up by the batch's pool index.

Rows (images/s and the ratio to the student alone) go to
bench/results/detection_distill_step.jsonl with the machine and commit.
"""

import pytest
import torch

from bench.common import interleaved_medians, write_rows
from pycompress.data import digit_detection
from pycompress.detection.distill import TeacherCache, distillation_step
from pycompress.distill.strategies import MehtaOzturk
from pycompress.models.detection import build_detector

BATCH = 32


def test_bench_distillation_step(benchmark):
    torch.manual_seed(0)
    images, boxes, labels, labeled = digit_detection("val", BATCH).tensors
    batch = (images, boxes, labels, labeled, torch.arange(BATCH))
    teacher = build_detector("yolo_teacher", width=16).eval().requires_grad_(False)
    cache = TeacherCache.build(teacher, images)
    strategy = MehtaOzturk()
    variants = {}
    for name, kwargs in (("student alone", {}), ("teacher every step", {"strategy": strategy, "teacher": teacher}),
                         ("teacher cache", {"strategy": strategy, "cache": cache})):
        student = build_detector("tiny_yolo", width=6)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        step = distillation_step(student, **kwargs)

        def train_step(student=student, optimizer=optimizer, step=step):
            optimizer.zero_grad(set_to_none=True)
            step(student, batch).backward()
            optimizer.step()

        variants[name] = train_step
    seconds = interleaved_medians(variants, repeats=15, warmup=3)
    benchmark.pedantic(variants["teacher cache"], rounds=1, iterations=1)
    alone = seconds["student alone"]
    rows = [dict(op="detection_distill_step", variant=name, student="tiny_yolo(width=6)",
                 teacher="yolo_teacher(width=16)", shape=f"({BATCH}, 3, 64, 64)", dtype="float32",
                 ms=round(s * 1e3, 3), images_per_second=round(BATCH / s, 1), vs_student_alone=round(alone / s, 3),
                 threads=torch.get_num_threads()) for name, s in seconds.items()]
    for r in rows:
        print(f"\n{r['variant']:<20} {r['ms']:>9.2f} ms  {r['images_per_second']:>8.1f} images/s  "
              f"{r['vs_student_alone']:.2f}x of the student alone")
    print("written to", write_rows("detection_distill_step", rows))
