"""`pycompress demo --quick`: the whole path at a size that runs in seconds; the report's content is checked."""

import json
import os

import pytest

from pycompress.cli import main
from pycompress.cli.demo import SIZES


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report, figure = out / "demo.json", out / "demo.png"
    assert main(["demo", "--quick", "--output", str(report), "--figure", str(figure)]) == 0
    return json.loads(report.read_text()), figure


def test_distillation_gain_is_computed_from_the_runs(quick_demo):
    d = quick_demo[0]["distillation"]
    assert len(d["hard_accuracy"]) == len(d["kd_accuracy"]) == len(SIZES["seeds"][1])
    gains = [s - h for s, h in zip(d["kd_accuracy"], d["hard_accuracy"])]
    assert d["gain_per_seed"] == pytest.approx(gains)
    assert d["gain_mean"] == pytest.approx(sum(gains) / len(gains))
    assert 0 < d["train_images"] < 1169 * 0.2  # the low-data regime, not the full set


def test_every_model_has_a_point_and_a_row(quick_demo):
    report, figure = quick_demo
    names = [r["model"] for r in report["models"]]
    for expected in ("teacher CNN", "hard labels", "Hinton KD", "VGG dense", "Taylor-pruned", "block-sparse",
                     "YOLO teacher", "tiny YOLO alone", "tiny YOLO distilled"):
        assert any(expected in n for n in names), expected
    for r in report["models"]:
        assert set(r) == {"model", "group", "parameters", "macs", "metric", "quality", "latency_ms"}
        assert r["parameters"] > 0 and r["macs"] > 0 and r["latency_ms"] > 0 and 0 <= r["quality"] <= 1
    assert report["figure"] == os.path.abspath(figure) and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pruned_model_is_about_ten_times_smaller(quick_demo):
    rows = {r["model"]: r for r in quick_demo[0]["models"]}
    assert rows["VGG dense"]["parameters"] / rows["VGG Taylor-pruned"]["parameters"] > 7
    assert quick_demo[0]["pruning"]["accuracy"]["pruned"] == rows["VGG Taylor-pruned"]["quality"]


def test_kernel_lines_are_the_reports_ratios(quick_demo):
    kernels = quick_demo[0]["kernels"]
    assert set(kernels) == {"kd_loss", "nms", "block_sparse_conv"}
    for k in kernels.values():
        assert k["speedup"] == pytest.approx(k["eager_ms"] / k["pycompress_ms"])
        assert f"({k['speedup']:.1f}x)" in k["line"]


def test_detection_runs_the_mehta_ozturk_workflow_with_the_teacher_cache(quick_demo):
    report = quick_demo[0]
    det, rows = report["detection"], {r["model"]: r for r in report["models"]}
    workflow = det["workflow"]
    assert workflow["config"]["strategies"] == ["mehta_ozturk"] and workflow["config"]["cache_teacher"]
    assert det["teacher_cache"]["images"] == det["labeled_images"] == SIZES["det_train_images"][1]
    assert rows["YOLO teacher"]["quality"] == workflow["teacher"]["test"]["AP50"]
    assert rows["tiny YOLO alone"]["quality"] == workflow["runs"]["student_alone"]["test"]["AP50"]["mean"]
    assert rows["tiny YOLO distilled"]["quality"] == workflow["runs"]["mehta_ozturk"]["test"]["AP50"]["mean"]
    assert rows["tiny YOLO distilled"]["parameters"] < rows["YOLO teacher"]["parameters"] / 10


def test_detection_is_skipped_with_a_reason_without_teacher(tmp_path, capsys, monkeypatch):
    from pycompress.cli import demo

    rows = []
    args = type("Args", (), {"detection_teacher": str(tmp_path / "missing.pt")})()
    out = demo._detection(args, {k: v[1] for k, v in SIZES.items()}, rows)
    assert "missing.pt" in out["skipped"] and rows == []
    assert "detection: skipped" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["demo", "--fraction", "1.5"]) == 2
    assert "--fraction" in capsys.readouterr().err
