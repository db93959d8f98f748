"""The digit-detection data: deterministic, boxes inside the canvas, disjoint splits, COCO export."""

import numpy as np
import pytest
import torch

from pycompress.data import digit_detection, digit_detection_splits, digits_splits, to_coco
from pycompress.data.detection import _source_pools, unpad_targets

SMALL = dict(image_size=32, max_size=16)


def test_same_seed_same_data_other_seed_other_data():
    a = digit_detection("val", 20, seed=3, **SMALL)
    b = digit_detection("val", 20, seed=3, **SMALL)
    c = digit_detection("val", 20, seed=4, **SMALL)
    for x, y in zip(a.tensors, b.tensors):
        assert torch.equal(x, y)
    assert not torch.equal(a.tensors[0], c.tensors[0])


def test_boxes_inside_canvas_and_well_formed():
    d = digit_detection("train", 50, max_objects=8, **SMALL)
    images, boxes, labels, labeled = d.tensors
    assert images.shape == (50, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    real = labels >= 0
    assert bool(labeled.all()) and bool(real.any(1).all())  # every canvas has at least one digit
    b = boxes[real]
    assert bool((b[:, :2] >= 0).all() and (b[:, 2:] <= 32).all())
    assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
    h = b[:, 3] - b[:, 1]
    assert h.min() >= 8 and h.max() <= 16
    assert set(labels[real].tolist()) <= set(range(10))
    assert bool((boxes[~real] == 0).all())


def test_splits_draw_from_disjoint_source_digits():
    pools = _source_pools(0)
    assert sum(len(p) for p in pools.values()) == 1797
    splits = digit_detection_splits(num_images={"train": 40, "val": 20, "test": 20, "unlabeled": 20}, **SMALL)
    used = {name: set(s.source_digits.tolist()) for name, s in zip(splits._fields, splits)}
    for name, u in used.items():
        assert u and u <= set(pools[name].tolist())
    names = list(used)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not used[names[i]] & used[names[j]]


def test_unlabeled_pool_withholds_boxes():
    u = digit_detection("unlabeled", 10, **SMALL)
    assert not bool(u.tensors[3].any()) and bool((u.tensors[2] == -1).all())


def test_coco_export_matches_targets():
    d = digit_detection("test", 5, **SMALL)
    coco = to_coco(d)
    assert [im["id"] for im in coco["images"]] == list(range(5))
    assert [c["id"] for c in coco["categories"]] == list(range(10))
    boxes, labels = unpad_targets(d.tensors[1], d.tensors[2])
    assert len(coco["annotations"]) == sum(len(lab) for lab in labels)
    first = coco["annotations"][0]
    x1, y1, x2, y2 = boxes[0][0].tolist()
    assert first["image_id"] == 0 and first["category_id"] == int(labels[0][0])
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


def test_targets_of_one_image_are_unpadded():
    d = digit_detection("val", 3, **SMALL)
    b, lab = d.targets(1)
    assert b.shape == (len(lab), 4) and bool((lab >= 0).all())


def test_classification_digits_still_importable():
    assert len(digits_splits().train) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="holdout"), "split"),
    (dict(num_images=0), "num_images"),
    (dict(min_size=20, max_size=10), "min_size"),
    (dict(image_size=16, max_size=28), "max_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digit_detection(**{"num_images": 2, **kwargs})


def test_bad_split_sizes():
    with pytest.raises(ValueError, match="unknown splits"):
        digit_detection_splits(num_images={"training": 3})


def test_canvases_hold_several_digits_of_varied_size():
    d = digit_detection("train", 200)
    n = (d.tensors[2] >= 0).sum(1)
    assert n.min() >= 1 and n.max() == 8 and 3 < n.float().mean() < 7
    h = (d.tensors[1][..., 3] - d.tensors[1][..., 1])[d.tensors[2] >= 0]
    assert (h < 12).any() and (h > 22).any()
    assert np.isfinite(d.tensors[0].numpy()).all()
