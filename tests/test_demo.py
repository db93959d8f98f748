"""`pycompress demo` end to end, at a size that runs in seconds."""

import json

import pytest

from pycompress.cli import main


def test_demo_runs_and_reports(tmp_path, capsys):
    report = tmp_path / "demo.json"
    assert main(["demo", "--epochs", "1", "--teacher-epochs", "1", "--seed", "1", "--bench-rows", "16",
                 "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert "student, kd" in out and "student, no distillation" in out and "faster" in out
    data = json.loads(report.read_text())
    assert data["teacher"]["parameters"] > 10 * data["distillation"]["student"]["parameters"]
    assert data["distillation"]["seeds"] == [1] and len(data["distillation"]["runs"]["kd"]["accuracy"]) == 1
    kernel = data["kernel"]
    assert f"({kernel['eager_ms'] / kernel['pycompress_ms']:.1f}x faster)" in out  # the printed ratio is the report's


def test_demo_rejects_bad_temperature(capsys):
    assert main(["demo", "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
