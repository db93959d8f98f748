"""Fused detection-distillation loss with FM-NMS, forward + backward, against eager PyTorch and torch.compile.

Run: python -m pytest bench/bench_detection_loss.py --benchmark-enable -s
The baselines are the loss of docs/yolo_loss.md written in eager PyTorch
(tests/test_detection_loss.py's reference) with the PyTorch-ops FM-NMS of
tests/test_nms.py, and torch.compile of that same code. All three compute the same
loss (FM-NMS on, objectness scaling on, K = 3) and the student's gradient.
"""

import pytest
import torch

from bench.common import interleaved_medians, write_rows
from pycompress.functional import detection_distill_loss
from tests.test_detection_loss import make_inputs, reference_detection_distill_loss
from tests.test_nms import fm_nms_torch  # the baselines live with the tests

SHAPES = {  # name: (B, A, C, H, W)
    "yolov2_voc": (64, 5, 20, 13, 13),
    "digits": (64, 5, 10, 16, 16),
}


def eager_loss(s, t, anchors, cls, box, labeled):
    return reference_detection_distill_loss(s, t, anchors, cls, box, labeled, fm_nms_fn=fm_nms_torch)


compiled_loss = torch.compile(eager_loss)


def fused_loss(s, t, anchors, cls, box, labeled):
    return detection_distill_loss(s, t, anchors, cls, box, labeled)


def _fwd_bwd(loss_fn, s, *rest):
    def run():
        s.grad = None
        loss_fn(s, *rest).backward()
    return run


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_detection_loss_forward_backward(benchmark, shape):
    B, A, C, H, W = SHAPES[shape]
    s, t, anchors, cls, box, labeled = make_inputs(B, A, C, H, W, objects=6)
    labeled[B // 2:] = False  # half of the batch from the unlabeled pool
    cls[B // 2:] = -1
    s.requires_grad_()
    inputs = (t, anchors, cls, box, labeled)
    variants = {name: _fwd_bwd(fn, s, *inputs)
                for name, fn in (("pycompress", fused_loss), ("eager", eager_loss), ("torch.compile", compiled_loss))}
    # The three agree before anything is timed.
    grads = {}
    for name, run in variants.items():
        run()
        grads[name] = s.grad.clone()
    torch.testing.assert_close(grads["pycompress"], grads["eager"], rtol=1e-4, atol=1e-6)
    med = interleaved_medians(variants, repeats=9, warmup=3)
    benchmark.pedantic(variants["pycompress"], rounds=3, warmup_rounds=1)

    # Bytes the fused op must move: read student, teacher, box, cls, keep; write the gradient.
    cells = B * A * H * W
    bytes_moved = cells * ((5 + C) * 4 * 3 + 4 * 4 + 8 + 1)
    rows = []
    print(f"\ndetection distill loss + FM-NMS fwd+bwd, {shape} (B, A, C, H, W) = {SHAPES[shape]}, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<14}{'ms':>9}{'GB/s':>8}{'ours faster by':>16}")
    for v, sec in med.items():
        ratio = sec / med["pycompress"]
        print(f"{v:<14}{sec * 1e3:>9.2f}{bytes_moved / sec / 1e9:>8.2f}{ratio:>15.2f}x")
        rows.append({"op": "detection_distill_loss+fm_nms fwd+bwd", "shape": list(SHAPES[shape]), "name": shape,
                     "dtype": "float32", "baseline": v, "ms": round(sec * 1e3, 3), "ratio": round(ratio, 3),
                     "gb_per_s": round(bytes_moved / sec / 1e9, 2)})
    print("written to", write_rows(f"detection_loss_{shape}", rows))
    assert med["pycompress"] > 0
