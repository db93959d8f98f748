"""Benchmarks of pycompress.functional.nms / batched_nms / fm_nms against their baselines.

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
Rows (op, shape, dtype, baseline, ms, ratio, threads) are printed and written to
bench/results/nms.jsonl with the machine and commit (bench/common.py).
"""

import os
import tempfile

import pytest
import torch
from torch.utils.cpp_extension import load_inline

from bench.common import interleaved_medians, write_rows
from pycompress.functional import batched_nms, fm_nms, nms
from tests.test_nms import fm_nms_torch  # the baseline lives with the tests

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


def _row(op, shape, baseline, ours, base, threads, detail=""):
    ROWS.append(dict(op=op, shape=shape, dtype="float32", baseline=baseline, ms=round(ours * 1e3, 3),
                     baseline_ms=round(base * 1e3, 3), ratio=round(base / ours, 2), threads=threads, detail=detail))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not ROWS:
        return
    print(f"\n\n{'op':<12} {'shape':<22} {'baseline':<28} {'ours ms':>9} {'base ms':>9} {'ratio':>8} {'threads':>7}  detail")
    for r in ROWS:
        print(f"{r['op']:<12} {r['shape']:<22} {r['baseline']:<28} {r['ms']:>9.2f} {r['baseline_ms']:>9.2f} "
              f"{r['ratio']:>7.2f}x {r['threads']:>7}  {r['detail']}")
    print("written to", write_rows("nms", ROWS))


@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_bench_nms(benchmark, textbook, n):
    boxes, scores, _ = detector_boxes(n)
    keep = nms(boxes, scores, IOU)
    assert torch.equal(keep, textbook.textbook_nms(boxes, scores, IOU))
    reps = {1000: 200, 5000: 20, 20000: 5}[n]
    med = interleaved_medians({"ours": lambda: nms(boxes, scores, IOU),
                               "textbook": lambda: textbook.textbook_nms(boxes, scores, IOU)}, repeats=reps, warmup=1)
    _row("nms", f"N={n}", "textbook O(N^2) loop", med["ours"], med["textbook"], 1, f"kept {len(keep)}")
    benchmark.pedantic(nms, args=(boxes, scores, IOU), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_bench_batched_nms(benchmark, textbook, n):
    boxes, scores, idxs = detector_boxes(n, seed=1)
    keep = batched_nms(boxes, scores, idxs, IOU)
    assert torch.equal(keep, textbook_batched(textbook, boxes, scores, idxs, IOU))
    reps = {1000: 100, 5000: 30, 20000: 10}[n]
    variants = {"ours": lambda: batched_nms(boxes, scores, idxs, IOU),
                "textbook": lambda: textbook_batched(textbook, boxes, scores, idxs, IOU)}
    threads = torch.get_num_threads()
    med = interleaved_medians(variants, repeats=reps, warmup=1)
    torch.set_num_threads(1)  # the per-category parallelism's share of the gain
    try:
        med1 = interleaved_medians(variants, repeats=reps, warmup=1)
    finally:
        torch.set_num_threads(threads)
    shape = f"N={n}, 20 classes"
    _row("batched_nms", shape, "textbook per-class loop", med["ours"], med["textbook"], threads)
    _row("batched_nms", shape, "textbook per-class loop", med1["ours"], med1["textbook"], 1)
    benchmark.pedantic(batched_nms, args=(boxes, scores, idxs, IOU), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("hw", [13, 52])
def test_bench_fm_nms(benchmark, hw):
    B, A, C = 64, 5, 20
    g = torch.Generator().manual_seed(hw)
    obj = torch.sigmoid(torch.randn(B, A, hw, hw, generator=g) * 2)
    probs = torch.softmax(torch.randn(B, A, C, hw, hw, generator=g) * 2, dim=2)
    keep = fm_nms(obj, probs, 3)
    assert torch.equal(keep, fm_nms_torch(obj, probs, 3))
    reps = {13: 20, 52: 3}[hw]
    variants = {"ours": lambda: fm_nms(obj, probs, 3), "torch": lambda: fm_nms_torch(obj, probs, 3)}
    threads = torch.get_num_threads()
    med = interleaved_medians(variants, repeats=reps, warmup=1)
    torch.set_num_threads(1)  # both sides on one core: robust to a busy second core
    try:
        med1 = interleaved_medians(variants, repeats=reps, warmup=1)
    finally:
        torch.set_num_threads(threads)
    shape = f"{B}x{A}x{C}x{hw}x{hw}"
    for m, t in ((med, threads), (med1, 1)):
        _row("fm_nms", shape, "PyTorch-ops greedy rounds", m["ours"], m["torch"], t,
             f"{B / m['ours']:,.0f} vs {B / m['torch']:,.0f} maps/s")
    benchmark.pedantic(fm_nms, args=(obj, probs, 3), rounds=3, warmup_rounds=1)
