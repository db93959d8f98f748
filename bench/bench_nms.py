"""Benchmarks of pycompress.ops.nms / batched_nms / fm_nms against their baselines.

Run explicitly (pyproject disables benchmarks and only collects tests/):

    python -m pytest bench/bench_nms.py --benchmark-enable -q -s

Baselines:
* nms: torchvision's CPU algorithm (stable sort, suppressed array, O(N^2) double
  loop), compiled here with load_inline at -O3 -march=native;
* batched_nms: torchvision's per-class loop (``_batched_nms_vanilla``) over that
  textbook nms;
* fm_nms: the PyTorch-ops version of the greedy rule from tests/test_nms.py.
Boxes look like detector outputs: 1000 x 1000 image, sides uniform in [20, 300],
20 classes, scores uniform. Every ratio is baseline time / our time, both medians
of interleaved runs (A B A B ...) in one process; the results must agree exactly.
Rows (op, shape, dtype, baseline, ratio, threads, machine, commit) are printed
and appended to .benchmarks/nms_rows.csv.
"""

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import pycompress  # noqa: E402
from pycompress.ops import batched_nms, fm_nms, nms  # noqa: E402
from test_nms import fm_nms_torch  # noqa: E402  (the baseline lives with the tests)

_TEXTBOOK = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

// torchvision's CPU nms algorithm, float32.
torch::Tensor textbook_nms(torch::Tensor dets, torch::Tensor scores, double iou_threshold) {
  if (dets.numel() == 0) return torch::empty({0}, torch::kLong);
  auto x1_t = dets.select(1, 0).contiguous(), y1_t = dets.select(1, 1).contiguous();
  auto x2_t = dets.select(1, 2).contiguous(), y2_t = dets.select(1, 3).contiguous();
  auto areas_t = (x2_t - x1_t) * (y2_t - y1_t);
  auto order_t = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const int64_t n = dets.size(0);
  std::vector<uint8_t> suppressed(n, 0);
  std::vector<int64_t> keep;
  const float* x1 = x1_t.data_ptr<float>(); const float* y1 = y1_t.data_ptr<float>();
  const float* x2 = x2_t.data_ptr<float>(); const float* y2 = y2_t.data_ptr<float>();
  const float* areas = areas_t.data_ptr<float>();
  const int64_t* order = order_t.data_ptr<int64_t>();
  for (int64_t _i = 0; _i < n; ++_i) {
    const int64_t i = order[_i];
    if (suppressed[i]) continue;
    keep.push_back(i);
    const float ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = areas[i];
    for (int64_t _j = _i + 1; _j < n; ++_j) {
      const int64_t j = order[_j];
      if (suppressed[j]) continue;
      const float xx1 = std::max(ix1, x1[j]), yy1 = std::max(iy1, y1[j]);
      const float xx2 = std::min(ix2, x2[j]), yy2 = std::min(iy2, y2[j]);
      const float w = std::max(0.0f, xx2 - xx1), h = std::max(0.0f, yy2 - yy1);
      const float inter = w * h;
      const float ovr = inter / (iarea + areas[j] - inter);
      if (ovr > iou_threshold) suppressed[j] = 1;
    }
  }
  return torch::tensor(keep, torch::kLong);
}
"""

IOU = 0.5
ROWS = []


@pytest.fixture(scope="module")
def textbook():
    build = os.path.join(tempfile.gettempdir(), "pycompress_bench_nms")
    os.makedirs(build, exist_ok=True)
    return load_inline("pycompress_bench_textbook_nms", cpp_sources=_TEXTBOOK, functions=["textbook_nms"],
                       extra_cflags=["-O3", "-march=native"], build_directory=build)


def textbook_batched(textbook, boxes, scores, idxs, thr):
    """torchvision's _batched_nms_vanilla over the textbook nms (stable final sort)."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        keep_mask[members[textbook.textbook_nms(boxes[members], scores[members], thr)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[scores[kept].sort(descending=True, stable=True).indices]


def detector_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 1000
    side = torch.rand(n, 2, generator=g) * 280 + 20
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 20, (n,), generator=g)


def interleaved(fns, reps):
    """Median time of each function, called in turn (A B A B ...) after one warm-up each."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for k, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _machine():
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {pycompress._extension.cpu_vector_bits()}-bit vec"


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _row(op, shape, dtype, baseline, ratio, threads, extra=""):
    ROWS.append(dict(op=op, shape=shape, dtype=dtype, baseline=baseline, ratio=round(ratio, 2), threads=threads,
                     extra=extra, machine=_machine(), commit=_commit()))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not ROWS:
        return
    print("\n\nop           shape                  dtype    baseline                        ratio  threads  detail")
    for r in ROWS:
        print(f"{r['op']:<12} {r['shape']:<22} {r['dtype']:<8} {r['baseline']:<31} {r['ratio']:>5.2f}x "
              f"{r['threads']:>7}  {r['extra']}")
    print(f"machine: {ROWS[0]['machine']}; commit {ROWS[0]['commit']}")
    out = os.path.join(ROOT, ".benchmarks", "nms_rows.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    new = not os.path.exists(out)
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        if new:
            w.writeheader()
        w.writerows(ROWS)


@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_bench_nms(benchmark, textbook, n):
    boxes, scores, _ = detector_boxes(n)
    keep = nms(boxes, scores, IOU)
    assert torch.equal(keep, textbook.textbook_nms(boxes, scores, IOU))
    reps = {1000: 200, 5000: 20, 20000: 5}[n]
    ours, base = interleaved([lambda: nms(boxes, scores, IOU), lambda: textbook.textbook_nms(boxes, scores, IOU)], reps)
    _row("nms", f"N={n}", "float32", "textbook O(N^2) loop", base / ours, 1,
         f"ours {ours * 1e3:.2f} ms, kept {len(keep)}")
    benchmark(nms, boxes, scores, IOU)


@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_bench_batched_nms(benchmark, textbook, n):
    boxes, scores, idxs = detector_boxes(n, seed=1)
    keep = batched_nms(boxes, scores, idxs, IOU)
    assert torch.equal(keep, textbook_batched(textbook, boxes, scores, idxs, IOU))
    reps = {1000: 100, 5000: 30, 20000: 10}[n]
    threads = torch.get_num_threads()
    ours, base = interleaved([lambda: batched_nms(boxes, scores, idxs, IOU),
                              lambda: textbook_batched(textbook, boxes, scores, idxs, IOU)], reps)
    torch.set_num_threads(1)  # the per-category parallelism's share of the gain
    try:
        ours1, base1 = interleaved([lambda: batched_nms(boxes, scores, idxs, IOU),
                                    lambda: textbook_batched(textbook, boxes, scores, idxs, IOU)], reps)
    finally:
        torch.set_num_threads(threads)
    _row("batched_nms", f"N={n}, 20 classes", "float32", "textbook per-class loop", base / ours, threads,
         f"ours {ours * 1e3:.2f} ms; both on 1 thread {base1 / ours1:.2f}x")
    benchmark(batched_nms, boxes, scores, idxs, IOU)


@pytest.mark.parametrize("hw", [13, 52])
def test_bench_fm_nms(benchmark, hw):
    B, A, C = 64, 5, 20
    g = torch.Generator().manual_seed(hw)
    obj = torch.sigmoid(torch.randn(B, A, hw, hw, generator=g) * 2)
    probs = torch.softmax(torch.randn(B, A, C, hw, hw, generator=g) * 2, dim=2)
    keep = fm_nms(obj, probs, 3)
    assert torch.equal(keep, fm_nms_torch(obj, probs, 3))
    reps = {13: 20, 52: 3}[hw]
    ours, base = interleaved([lambda: fm_nms(obj, probs, 3), lambda: fm_nms_torch(obj, probs, 3)], reps)
    _row("fm_nms", f"{B}x{A}x{C}x{hw}x{hw}", "float32", "PyTorch-ops greedy rounds", base / ours,
         torch.get_num_threads(), f"ours {B / ours:,.0f} maps/s vs {B / base:,.0f} maps/s")
    benchmark(fm_nms, obj, probs, 3)
