"""Detector distillation workflow (pycompress.detection.distill): config, pool, cache, resume, CLI."""

import pytest
import torch

from pycompress.config import DistillConfig, load_config, replace
from pycompress.data import digit_detection_splits
from pycompress.detection.distill import (TeacherCache, detection_splits, distillation_step, distill_detector,
                                          training_pool)
from pycompress.distill.strategies import STRATEGIES, MehtaOzturk, make_strategy
from pycompress.models.detection import build_detector

DATA = {"dataset": "pycompress.data:digit_detection_splits",
        "kwargs": {"num_images": {"train": 16, "val": 8, "test": 8, "unlabeled": 32}, "image_size": 32,
                   "max_size": 16}}
SMALL = {"width": 2, "image_size": 32}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_detector("yolo_teacher", **SMALL).state_dict(), path)  # untrained: any fixed map will do
    return str(path)


def small_config(teacher_path, **changes):
    base = replace(DistillConfig(), seeds=[0], strategies=["mehta_ozturk"], progress=False,
                   teacher={"model": "yolo_teacher", "kwargs": SMALL, "checkpoints": [teacher_path]},
                   student={"model": "tiny_yolo", "kwargs": SMALL}, data=DATA,
                   train={"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3},
                   detection={"unlabeled_ratio": 1.0})
    return replace(base, **changes)


def test_strategy_is_registered_and_checks_options():
    assert STRATEGIES["mehta_ozturk"] is MehtaOzturk and MehtaOzturk.task == "detection"
    s = make_strategy("mehta_ozturk", {"fm_nms": False, "lambda_distill": 0.5})
    assert s.options() == {"fm_nms": False, "objectness_scaling": True, "suppress_objectness": False,
                           "lambda_distill": 0.5}
    with pytest.raises(ValueError, match="lambda_distill"):
        MehtaOzturk(lambda_distill=-1.0)
    with pytest.raises(TypeError, match="fm_nms"):
        MehtaOzturk(fm_nms=1)
    with pytest.raises(TypeError, match="detection strategy"):
        s.step_fn(None)


def test_config_file_flags_and_python_agree(tmp_path):
    from pycompress.cli import build_parser
    from pycompress.cli.distill import load

    path = tmp_path / "distill.toml"
    path.write_text('strategies = ["mehta_ozturk"]\n[detection]\nunlabeled_ratio = 2.0\nteacher_cache_dtype = '
                    '"float32"\n[strategy.mehta_ozturk]\nfm_nms = false\n')
    from_file = load_config(DistillConfig(), str(path))
    python = replace(DistillConfig(), strategies=["mehta_ozturk"], strategy={"mehta_ozturk": {"fm_nms": False}},
                     detection={"unlabeled_ratio": 2.0, "teacher_cache_dtype": "float32"})
    args = build_parser().parse_args(["distill", "--strategy", "mehta_ozturk", "--unlabeled-ratio", "2",
                                      "--set", "detection.teacher_cache_dtype=float32",
                                      "--set", "strategy.mehta_ozturk.fm_nms=false"])
    assert from_file == python == load(args)
    with pytest.raises(ValueError, match="unlabeled_ratio"):
        replace(DistillConfig(), detection={"unlabeled_ratio": -1.0})
    with pytest.raises(ValueError, match="teacher_cache_dtype"):
        replace(DistillConfig(), detection={"teacher_cache_dtype": "int8"})
    with pytest.raises(ValueError, match="one distill run is one task"):
        replace(DistillConfig(), strategies=["hinton", "mehta_ozturk"])


def test_training_pool_mixes_unlabeled_images_at_the_ratio():
    splits = digit_detection_splits(num_images={"train": 6, "val": 1, "test": 1, "unlabeled": 20}, image_size=32,
                                    max_size=16)
    pool = training_pool(splits.train, splits.unlabeled, 2.0)
    images, boxes, labels, labeled, index = pool.tensors
    assert len(pool) == 18 and labeled.tolist() == [True] * 6 + [False] * 12
    assert torch.equal(images[6:], splits.unlabeled.tensors[0][:12]) and torch.equal(index, torch.arange(18))
    assert bool((labels[6:] == -1).all()) and torch.equal(labels[:6], splits.train.tensors[2])
    assert len(training_pool(splits.train, None, 0.0)) == 6
    with pytest.raises(ValueError, match="unlabeled_ratio"):
        training_pool(splits.train, splits.unlabeled, 4.0)
    with pytest.raises(ValueError, match="unlabeled"):
        training_pool(splits.train, None, 1.0)


@pytest.mark.parametrize("fm_nms", [True, False])
def test_cached_step_equals_teacher_every_step(fm_nms):
    torch.manual_seed(0)
    teacher = build_detector("yolo_teacher", **SMALL).eval()
    student = build_detector("tiny_yolo", **SMALL)
    splits = digit_detection_splits(num_images={"train": 8, "val": 1, "test": 1, "unlabeled": 8}, image_size=32,
                                    max_size=16)
    pool = training_pool(splits.train, splits.unlabeled, 1.0)
    batch = [t[3:13] for t in pool.tensors]  # labeled and unlabeled images
    strategy = MehtaOzturk(fm_nms=fm_nms)
    every_step = distillation_step(student, strategy, teacher=teacher)(student, batch)
    exact = TeacherCache.build(teacher, pool.tensors[0], torch.float32, batch_size=5)
    cached = distillation_step(student, strategy, cache=exact)(student, batch)
    torch.testing.assert_close(cached, every_step, rtol=1e-5, atol=1e-6)
    fp16 = TeacherCache.build(teacher, pool.tensors[0])
    assert fp16.raw.dtype == torch.float16 and fp16.keep.dtype == torch.bool
    assert torch.equal(fp16.keep, exact.keep)  # the keep mask comes from the fp32 map either way
    torch.testing.assert_close(distillation_step(student, strategy, cache=fp16)(student, batch), every_step,
                               rtol=2e-3, atol=1e-4)
    alone = distillation_step(student)(student, batch)
    assert not torch.allclose(alone, every_step)  # the teacher terms are there
    with pytest.raises(ValueError, match="teacher or its cache"):
        distillation_step(student, strategy)


def _final_student(ckpt_dir, label="mehta_ozturk"):
    return torch.load(f"{ckpt_dir}/{label}_seed0.pt", weights_only=False)["model"]


def test_resume_is_bit_identical_and_cache_trains_like_the_teacher(tmp_path, teacher_path):
    full_dir, part_dir, exact_dir, online_dir = (str(tmp_path / d) for d in ("full", "part", "exact", "online"))
    report = distill_detector(small_config(teacher_path, checkpoint_dir=full_dir, output=str(tmp_path / "r.json")))
    assert set(report["runs"]) == {"student_alone", "mehta_ozturk"}
    assert report["labeled_images"] == 16 and report["unlabeled_images"] == 16
    run = report["runs"]["mehta_ozturk"]
    assert {"val", "test", "paired_test_AP50", "paired_test_AP"} <= set(run) and (tmp_path / "r.json").exists()
    assert report["teacher_cache"]["dtype"] == "float16"
    distill_detector(small_config(teacher_path, checkpoint_dir=part_dir, train={"max_steps": 3}))
    resumed = distill_detector(small_config(teacher_path, checkpoint_dir=part_dir, resume=True))
    a, b = _final_student(full_dir), _final_student(part_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["runs"]["mehta_ozturk"]["test"] == run["test"]

    exact = small_config(teacher_path, baseline=False, detection={"teacher_cache_dtype": "float32",
                                                                  "unlabeled_ratio": 1.0})
    distill_detector(replace(exact, checkpoint_dir=exact_dir))
    distill_detector(replace(exact, checkpoint_dir=online_dir, cache_teacher=False))
    a, b = _final_student(exact_dir), _final_student(online_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_checkpoint_of_other_distillation_settings(tmp_path, teacher_path):
    # the checkpoint once recorded only the recipe: a resume under another lambda_distill or pool
    # silently continued the old student
    ckpt = str(tmp_path / "ckpt")
    distill_detector(small_config(teacher_path, checkpoint_dir=ckpt, train={"max_steps": 1}))
    with pytest.raises(ValueError, match="lambda_distill"):
        distill_detector(small_config(teacher_path, checkpoint_dir=ckpt, resume=True, baseline=False,
                                      strategy={"mehta_ozturk": {"lambda_distill": 2.0}}))
    with pytest.raises(ValueError, match="unlabeled_ratio"):
        distill_detector(small_config(teacher_path, checkpoint_dir=ckpt, resume=True, baseline=False,
                                      detection={"unlabeled_ratio": 2.0}))
    # the student alone does not depend on the teacher's settings: it resumes
    report = distill_detector(small_config(teacher_path, checkpoint_dir=ckpt, resume=True, strategies=[],
                                           detection={"unlabeled_ratio": 2.0}))
    assert set(report["runs"]) == {"student_alone"}


def test_given_splits_train_the_same_students_and_a_missing_test_split_is_not_scored(teacher_path):
    cfg = small_config(teacher_path, baseline=False, train={"epochs": 1, "batch_size": 8})
    splits = detection_splits(cfg)
    generated = distill_detector(cfg)
    given = distill_detector(cfg, splits=splits, evaluate_teacher=False)
    assert given["runs"]["mehta_ozturk"]["seeds"] == generated["runs"]["mehta_ozturk"]["seeds"]
    assert "test" in generated["teacher"] and set(given["teacher"]) == {"params"}
    val_only = distill_detector(cfg, splits=(splits[0], splits[1], None, splits[3]), evaluate_teacher=False)
    assert set(val_only["runs"]["mehta_ozturk"]["seeds"]["0"]) == {"val"}
    with pytest.raises(ValueError, match="splits"):
        distill_detector(cfg, splits=splits[:3])


def test_distill_cli_runs_detection(tmp_path, teacher_path):
    from pycompress.cli import main

    out = tmp_path / "report.json"
    assert main(["distill", "--strategy", "mehta_ozturk", "--teacher-checkpoint", teacher_path, "--seed", "0",
                 "--set", "teacher.model=yolo_teacher", "--set", "teacher.kwargs={width = 2, image_size = 32}",
                 "--set", "student.model=tiny_yolo", "--set", "student.kwargs={width = 2, image_size = 32}",
                 "--set", "data.dataset=pycompress.data:digit_detection_splits",
                 "--set", "data.kwargs={num_images = {train = 8, val = 4, test = 4, unlabeled = 8}, "
                          "image_size = 32, max_size = 16}",
                 "--set", "train.batch_size=8", "--epochs", "1", "--unlabeled-ratio", "1", "--no-progress",
                 "--output", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["unlabeled_images"] == 8 and report["runs"]["mehta_ozturk"]["strategy"] == "mehta_ozturk"
    assert main(["distill", "--strategy", "mehta_ozturk", "--set", "detection.unlabeled_ratio=-1"]) == 2
