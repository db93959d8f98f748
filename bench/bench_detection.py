"""Benchmarks of the detectors: training images/s, inference latency, and postprocess.

Run explicitly (pyproject disables benchmarks and only collects tests/):

    python -m pytest bench/bench_detection.py --benchmark-enable -q -s

* training: one optimizer step (forward, target encoding, loss, backward, AdamW) on a
  batch of 32 digit-detection canvases (64 x 64), every registered detector timed
  interleaved (A B C A B C ...) in one process; reported as images/s;
* inference: eval-mode forward at batch 1 and 32, interleaved the same way;
* postprocess: ``model.postprocess`` (vectorised decode, one ``batched_nms`` per image)
  against a plain-PyTorch decode followed by a per-class greedy NMS loop written with
  tensor ops, on the same raw maps (batch 32); the detections must agree exactly.
Rows are printed and written to bench/results/detection.jsonl with the machine and commit.
Thread count: ``torch.get_num_threads()`` (recorded in each row); ratios are what count.
"""

import pytest
import torch

from bench.common import interleaved_medians, write_rows
from pycompress.data import digit_detection
from pycompress.detection.workflow import detection_step
from pycompress.models.detection import DETECTORS, build_detector
from pycompress.prune.graph import count_params_flops

ROWS = []
SCORE, IOU, MAX_DET = 0.01, 0.5, 100


@pytest.fixture(scope="module")
def batch():
    return digit_detection("val", 32).tensors


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not ROWS:
        return
    print(f"\n\n{'op':<14} {'detector':<18} {'shape':<16} {'ms':>9} {'baseline':<30} {'ratio':>7}  detail")
    for r in ROWS:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        print(f"{r['op']:<14} {r['detector']:<18} {r['shape']:<16} {r['ms']:>9.2f} {r['baseline']:<30} {ratio:>7}  "
              f"{r['detail']}")
    print("written to", write_rows("detection", ROWS))


def _row(op, detector, shape, seconds, detail, baseline="-", baseline_seconds=None):
    ROWS.append(dict(op=op, detector=detector, shape=shape, dtype="float32", ms=round(seconds * 1e3, 3),
                     baseline=baseline, baseline_ms=round(baseline_seconds * 1e3, 3) if baseline_seconds else None,
                     ratio=round(baseline_seconds / seconds, 2) if baseline_seconds else None,
                     threads=torch.get_num_threads(), detail=detail))


def test_bench_training_and_inference(benchmark, batch):
    torch.manual_seed(0)
    models = {name: build_detector(name) for name in sorted(DETECTORS)}
    steps = {}
    for name, m in models.items():
        step = detection_step(m, m.criterion())
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def train_step(m=m, step=step, opt=opt):
            loss = step(m, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = train_step
    med = interleaved_medians(steps, repeats=5, warmup=1)
    for name, m in models.items():
        params, macs = count_params_flops(m, torch.zeros(1, 3, 64, 64))
        _row("train_step", name, "B=32 3x64x64", med[name],
             f"{32 / med[name]:.1f} images/s, {params:,} params, {macs / 1e6:.1f} M MACs")
        m.eval()
    for bs in (1, 32):
        x = batch[0][:bs]

        def infer(m):
            def run():
                with torch.inference_mode():
                    return m(x)
            return run
        med = interleaved_medians({name: infer(m) for name, m in models.items()}, repeats=20 if bs == 1 else 7,
                                  warmup=2)
        for name in models:
            _row("inference", name, f"B={bs} 3x64x64", med[name], f"{bs / med[name]:.1f} images/s")
    benchmark.pedantic(steps["tiny_yolo"], rounds=2, warmup_rounds=0)


def _greedy_nms_torch(boxes, scores, thr):
    """The textbook greedy loop in tensor ops: take the best, drop what overlaps it, repeat."""
    order = scores.argsort(descending=True, stable=True)
    keep = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        iou = inter / (area(boxes[i]) + area(boxes[rest]) - inter)
        order = rest[~(iou > thr)]  # NaN IoU (zero-area boxes) suppresses nothing, as in torchvision
    return torch.tensor(keep, dtype=torch.long)


def plain_yolo_postprocess(raw, anchors, stride, image_size):
    """Decode with explicit grid arithmetic, then greedy NMS class by class."""
    b_n, a_n, _, h, w = raw.shape
    out = []
    for b in range(b_n):
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        r = raw[b]
        cx = (jj + r[:, 0].sigmoid()) * stride
        cy = (ii + r[:, 1].sigmoid()) * stride
        bw = anchors[:, 0, None, None] * r[:, 2].exp() * stride
        bh = anchors[:, 1, None, None] * r[:, 3].exp() * stride
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).reshape(-1, 4)
        boxes = boxes.clamp(0, image_size)
        scores = (r[:, 4].sigmoid()[:, None] * r[:, 5:].softmax(1)).permute(0, 2, 3, 1).reshape(-1, r.shape[1] - 5)
        kb, ks, kl = [], [], []
        for c in range(scores.shape[1]):
            sel = torch.where(scores[:, c] > SCORE)[0]
            keep = _greedy_nms_torch(boxes[sel], scores[sel, c], IOU)
            kb.append(boxes[sel][keep])
            ks.append(scores[sel, c][keep])
            kl.append(torch.full((len(keep),), c))
        s = torch.cat(ks)
        order = s.argsort(descending=True, stable=True)[:MAX_DET]
        out.append({"boxes": torch.cat(kb)[order], "scores": s[order], "labels": torch.cat(kl)[order]})
    return out


def test_bench_postprocess(benchmark, batch):
    torch.manual_seed(0)
    model = build_detector("yolo_teacher").eval()
    with torch.inference_mode():
        raw = model(batch[0]) * 3  # an untrained map, sharpened: a few hundred candidates per image
    ours = model.postprocess(raw, SCORE, IOU, MAX_DET)
    plain = plain_yolo_postprocess(raw, model.anchors, model.stride, model.image_size)
    for a, b in zip(ours, plain):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
    candidates = int((model.decode(raw)[1] > SCORE).sum())
    med = interleaved_medians({"ours": lambda: model.postprocess(raw, SCORE, IOU, MAX_DET),
                               "plain": lambda: plain_yolo_postprocess(raw, model.anchors, model.stride, 64)},
                              repeats=7, warmup=1)
    _row("postprocess", "yolo_teacher", f"B=32 {tuple(raw.shape[1:])}", med["ours"],
         f"{candidates / 32:.0f} candidates/image, {sum(len(o['labels']) for o in ours) / 32:.0f} kept/image",
         "plain decode + per-class NMS loop", med["plain"])
    benchmark.pedantic(model.postprocess, args=(raw, SCORE, IOU, MAX_DET), rounds=3, warmup_rounds=1)
