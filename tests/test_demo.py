"""`pycompress demo` end to end, at a size that runs in seconds."""

import json

import pytest

from pycompress.cli import main


def test_demo_runs_and_reports(tmp_path, capsys):
    report = tmp_path / "demo.json"
    assert main(["demo", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--bench-rows", "16",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "student, kd" in out and "student, no distillation" in out and "faster" in out
    data = json.loads(report.read_text())
    assert data["teacher"]["parameters"] > 10 * data["distillation"]["student"]["parameters"]
    assert 0.0 <= data["distillation"]["runs"]["kd"]["mean"] <= 1.0
    assert data["kernel"]["pycompress_ms"] > 0


def test_demo_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        main(["demo", "--temperature", "0"])
