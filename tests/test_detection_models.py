"""The detectors: registry, shapes, fx tracing, pruning, postprocess vs a plain-Python reference,
a few training steps, COCO mAP of ground truth and of corrupted ground truth."""

import pytest
import torch
from torch import nn

from pycompress.data import digit_detection
from pycompress.detection import coco_map, evaluate
from pycompress.config import TrainDetectorConfig, load_config, replace
from pycompress.detection.workflow import detection_step
from pycompress.models.detection import DETECTORS, build_detector, detector_names

SMALL = {"yolo_teacher": dict(width=4), "tiny_yolo": dict(width=4), "deep_narrow_yolo": dict(width=4),
         "ssd": dict(width=4)}


def small(name, image_size=32):
    return build_detector(name, image_size=image_size, **SMALL[name])


def test_registry():
    assert detector_names() == sorted(SMALL)
    assert isinstance(build_detector("pycompress.models.detection:TinyYOLO", width=4), DETECTORS["tiny_yolo"])
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo9000")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_layout_and_fx_trace(name):
    torch.manual_seed(0)
    model = small(name).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    if name == "ssd":
        loc, conf = out
        assert loc.shape == (2, len(model.default_boxes), 4) and conf.shape == (2, loc.shape[1], 11)
        assert {8, 16, 32} == set(model.strides)
    else:
        assert out.shape == (2, len(model.anchors), 15, 4, 4)
    traced = torch.fx.symbolic_trace(model)
    again = traced(x)
    for a, b in zip(out if name == "ssd" else (out,), again if name == "ssd" else (again,)):
        torch.testing.assert_close(a, b)
    # the head convolutions are nodes of the graph (what pruning needs)
    heads = [n.target for n in traced.graph.nodes if n.op == "call_module" and "head" in n.target]
    assert heads


def _randomized(model):
    """Random BatchNorm statistics and affines, so that a removed channel is not zero in the reference."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.double().eval()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pruned_detector_equals_its_masked_original_and_postprocesses(name):
    """Heads keep their output channels (anchors x classes); every other conv prunes; the pruned
    detector computes what the dense one computes with the removed channels zeroed (float64)."""
    from pycompress.prune import L1, DependencyGraph, masked_forward, plan_removal

    torch.manual_seed(0)
    model = _randomized(small(name))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    graph = DependencyGraph(model, x)
    heads = [m for grp in graph.groups for m in grp.members if "head" in m.module and m.kind == "out"]
    assert heads and all(graph.group_of(str(m)).locked for m in heads)
    head_shapes = {m.module: model.get_submodule(m.module).weight.shape[0] for m in heads}
    units, reached = plan_removal(graph, L1().scores(graph), target_params=int(0.6 * graph.cost()[0]))
    assert reached and units
    reference = masked_forward(graph, units, x)
    graph.remove(units)
    with torch.no_grad():
        out = model(x)
    for o, r in zip(out if name == "ssd" else (out,), reference if name == "ssd" else (reference,)):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=0, atol=1e-6)
    assert {m: model.get_submodule(m).weight.shape[0] for m in head_shapes} == head_shapes
    assert sum(p.numel() for p in model.parameters()) < 0.7 * sum(p.numel() for p in small(name).parameters())
    detections = model.float().postprocess(model(x.float()), score_threshold=0.0, iou_threshold=0.5,
                                           max_detections=5)
    assert len(detections) == 2


def reference_postprocess(boxes, scores, score_threshold, iou_threshold, max_detections):
    """Plain Python: every (candidate, class) above the threshold, greedy NMS within each class."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
        return iw * ih / union if union > 0 else 0.0

    cands = [(float(scores[i, c]), i, c) for i in range(len(boxes)) for c in range(scores.shape[1])
             if scores[i, c] > score_threshold]
    cands.sort(key=lambda t: -t[0])
    kept = []
    for s, i, c in cands:
        if all(not (kc == c and iou(boxes[i].tolist(), boxes[ki].tolist()) > iou_threshold) for _, ki, kc in kept):
            kept.append((s, i, c))
    return kept[:max_detections]


@pytest.mark.parametrize("name", ["tiny_yolo", "ssd"])
def test_postprocess_matches_plain_python(name):
    torch.manual_seed(1)
    model = small(name).eval()
    with torch.no_grad():
        raw = model(torch.rand(2, 3, 32, 32))
    if name == "ssd":
        raw = (raw[0] * 3, raw[1] * 3)  # sharper scores: several above the threshold
        from pycompress.detection import decode_ssd_boxes
        boxes = decode_ssd_boxes(raw[0], model.default_boxes).clamp(0, 32)
        scores = torch.softmax(raw[1], -1)[..., 1:]
    else:
        raw = raw * 3
        boxes, scores = model.decode(raw)
        boxes = boxes.clamp(0, 32)
    out = model.postprocess(raw, score_threshold=0.05, iou_threshold=0.4, max_detections=7)
    for n, det in enumerate(out):
        ref = reference_postprocess(boxes[n], scores[n], 0.05, 0.4, 7)
        assert len(ref) > 1
        assert det["labels"].tolist() == [c for _, _, c in ref]
        torch.testing.assert_close(det["scores"], torch.tensor([s for s, _, _ in ref]))
        torch.testing.assert_close(det["boxes"], boxes[n][[i for _, i, _ in ref]])


def test_yolo_decode_reference():
    model = small("tiny_yolo")
    raw = torch.randn(1, 3, 15, 4, 4)
    boxes, scores = model.decode(raw)
    a, i, j = 2, 1, 3
    v = raw[0, a, :, i, j]
    cx, cy = (j + torch.sigmoid(v[0])) * 8, (i + torch.sigmoid(v[1])) * 8
    w, h = model.anchors[a, 0] * torch.exp(v[2]) * 8, model.anchors[a, 1] * torch.exp(v[3]) * 8
    k = (a * 4 + i) * 4 + j
    torch.testing.assert_close(boxes[0, k], torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(scores[0, k], torch.sigmoid(v[4]) * torch.softmax(v[5:], 0))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bad_inputs(name):
    model = small(name)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 3, 30, 32))
    with pytest.raises(TypeError, match="images"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    raw = model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="score_threshold"):
        model.postprocess(raw, score_threshold=1.5)
    with pytest.raises(ValueError, match="max_detections"):
        model.postprocess(raw, max_detections=0)
    with pytest.raises(ValueError, match="labels"):
        model.encode_targets([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [torch.tensor([10])])
    with pytest.raises(ValueError, match="inside"):
        model.encode_targets([torch.tensor([[0.0, 0.0, 40.0, 4.0]])], [torch.tensor([1])])
    with pytest.raises(ValueError, match="num_classes"):
        build_detector(name, num_classes=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_few_steps_lower_the_loss_and_empty_images_work(name):
    data = digit_detection("train", 16, image_size=32, max_size=16, seed=1)
    images, boxes, labels, labeled = data.tensors
    labels = labels.clone()
    labels[0] = -1  # an image without any object
    torch.manual_seed(0)
    model = small(name)
    step = detection_step(model, model.criterion())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = (images, boxes, labels, labeled)
    losses = []
    for _ in range(15):
        loss = step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert step.images == 16 * 15


# ------------------------------------------------------------------ mAP
class OracleDetector(nn.Module):
    """Returns given detections for the images, in dataset order (as evaluate visits them)."""

    num_classes = 10

    def __init__(self, detections):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.detections, self.cursor = detections, 0

    def forward(self, images):
        return images

    def postprocess(self, raw, score_threshold, iou_threshold, max_detections):
        out = self.detections[self.cursor:self.cursor + len(raw)]
        self.cursor += len(raw)
        return out


def _gt_detections(data, shift=0.0, relabel=None):
    out = []
    for i in range(len(data)):
        b, lab = data.targets(i)
        b = b.clone()
        b[:, [0, 2]] += shift * (b[:, 2:3] - b[:, 0:1])
        if relabel is not None:
            lab = relabel(lab)
        out.append({"boxes": b, "scores": torch.linspace(1.0, 0.5, len(b)), "labels": lab})
    return out


def test_map_of_ground_truth_is_one_and_degrades():
    data = digit_detection("test", 30, image_size=32, max_size=16)
    perfect = evaluate(OracleDetector(_gt_detections(data)), data, batch_size=7)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    present = {str(c) for c in data.tensors[2][data.tensors[2] >= 0].tolist()}
    assert all(v == pytest.approx(1.0) for k, v in perfect["per_class_AP50"].items() if k in present)
    assert all(v is None for k, v in perfect["per_class_AP50"].items() if k not in present)
    # shifted by 20 % of the width: IoU 0.67, still a hit at .5, a miss from .7 on
    shifted = evaluate(OracleDetector(_gt_detections(data, shift=0.2)), data)
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP"] < 0.5
    # shifted by 60 %: IoU 0.25, a miss everywhere
    assert evaluate(OracleDetector(_gt_detections(data, shift=0.6)), data)["AP50"] == pytest.approx(0.0)
    # swapping labels 3 <-> 5 zeroes exactly those classes
    swap = evaluate(OracleDetector(_gt_detections(data, relabel=lambda lab: torch.where(
        lab == 3, 5, torch.where(lab == 5, 3, lab)))), data)
    assert swap["per_class_AP50"]["3"] == pytest.approx(0.0) and swap["per_class_AP50"]["5"] == pytest.approx(0.0)
    assert swap["per_class_AP50"]["0"] == pytest.approx(1.0) and swap["AP50"] < 0.9


def test_map_without_detections_and_bad_inputs():
    data = digit_detection("test", 5, image_size=32, max_size=16)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 5
    assert evaluate(OracleDetector(empty), data)["AP50"] == 0.0
    with pytest.raises(TypeError, match="postprocess"):
        evaluate(nn.Linear(2, 2), data)
    with pytest.raises(ValueError, match="labeled"):
        evaluate(OracleDetector(empty), digit_detection("unlabeled", 5, image_size=32, max_size=16))
    assert coco_map({"images": [], "annotations": [], "categories": [{"id": 0}]}, [])["AP"] == 0.0


# ------------------------------------------------------------------ workflow
def test_config_rejects_unknown_keys_and_parses_overrides():
    cfg = load_config(TrainDetectorConfig(), None, ["detector.model=tiny_yolo", "train.epochs=2",
                                                    "detector.kwargs={width = 4}"])
    assert cfg.detector.model == "tiny_yolo" and cfg.train.epochs == 2 and cfg.detector.kwargs == {"width": 4}
    assert cfg.train.optimizer == "adamw" and cfg.train.warmup_steps == 100  # the detector recipe's defaults
    with pytest.raises(ValueError, match="epoch"):
        load_config(TrainDetectorConfig(), None, ["train.epoch=2"])


def test_train_detector_resume_is_bit_identical(tmp_path):
    from pycompress.detection.workflow import train_detector

    base = replace(TrainDetectorConfig(), detector={"model": "tiny_yolo", "kwargs": {"width": 4, "image_size": 32}},
                   data={"dataset": "pycompress.data:digit_detection_splits",
                         "kwargs": {"num_images": {"train": 24, "val": 8, "test": 8, "unlabeled": 1},
                                    "image_size": 32, "max_size": 16}},
                   train={"epochs": 2, "batch_size": 8, "warmup_steps": 2}, latency_batch_sizes=[1],
                   progress=False, eval_every_epoch=False)
    full = train_detector(replace(base, output=str(tmp_path / "full.json"), save_model=str(tmp_path / "full.pt")))
    assert {"params", "macs", "flops", "train", "test", "latency_ms"} <= set(full)
    assert full["flops"] == 2 * full["macs"] and full["train"]["images"] == 48
    assert (tmp_path / "full.json").exists()
    ckpt = str(tmp_path / "ckpt")
    train_detector(replace(base, train={"max_steps": 4}, checkpoint_dir=ckpt))
    train_detector(replace(base, checkpoint_dir=ckpt, resume=True, save_model=str(tmp_path / "resumed.pt")))
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_detector_cli(tmp_path, capsys):
    from pycompress.cli import main

    out = tmp_path / "report.json"
    assert main(["train-detector", "--detector", "tiny_yolo", "--detector-kwargs", '{"width": 4, "image_size": 32}',
                 "--set", "data.kwargs={num_images = {train = 8, val = 4, test = 4, unlabeled = 1}, "
                 "image_size = 32, max_size = 16}", "--epochs", "1", "--set", "train.batch_size=4",
                 "--set", "latency_batch_sizes=[1]", "--seed", "1", "--output", str(out), "--no-progress"]) == 0
    import json
    report = json.loads(out.read_text())
    assert report["config"]["seeds"] == [1] and report["config"]["train"]["epochs"] == 1
    assert "TinyYOLO" in capsys.readouterr().out
    assert main(["train-detector", "--set", "train.epoch=1"]) == 2  # bad input: one line, status 2
