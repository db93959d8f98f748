"""Pruning detectors end to end (issue 14): the detection task (the detector's own loss, AP50 as
quality), Singh's phase plan, bad input, and deployment of a pruned detector (save / reload,
torch.compile, torch.export, ONNX Runtime, the refusal of block-sparse layers)."""

import importlib.util

import pytest
import torch
from torch import nn

from pycompress.data import digit_detection_splits
from pycompress.models.detection import build_detector
from pycompress.prune import L1, OneShot, Phased, Target, load_pruned_state_dict, prune
from pycompress.prune.tasks import ClassificationTask, DetectionTask, get_task

HAS_DEPLOY = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
needs_deploy = pytest.mark.skipif(not HAS_DEPLOY, reason="needs the deploy extra: pip install 'pycompress[deploy]'")


@pytest.fixture(scope="module")
def data():
    return digit_detection_splits(num_images={"train": 32, "val": 16, "test": 16, "unlabeled": 1}, image_size=32)


def small_ssd():
    torch.manual_seed(0)
    return build_detector("ssd", width=4, image_size=32).eval()


@pytest.fixture(scope="module")
def pruned_ssd():
    model = small_ssd()
    return model, prune(model, torch.rand(1, 3, 32, 32), L1(), OneShot(), Target(params=0.5)).eval()


def test_task_is_chosen_by_model_and_a_detection_loss_refuses_a_classifier(data):
    assert isinstance(get_task("auto", small_ssd()), DetectionTask)
    assert isinstance(get_task("auto", nn.Linear(4, 2)), ClassificationTask)
    with pytest.raises(TypeError, match="task 'detection' cannot handle Sequential.*encode_targets"):
        get_task("detection", nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
    with pytest.raises(ValueError, match="task must be 'auto' or one of"):
        get_task("segmentation", small_ssd())
    task, model = DetectionTask(), small_ssd()
    batch = [torch.stack(t) for t in zip(*[data.train[i] for i in range(4)])]
    loss = task.loss_fn(model, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and model.loc_heads[0].weight.grad.abs().sum() > 0
    assert set(task.evaluate(model, data.val)) == {"AP50", "AP", "AP75"}


def test_singh_on_a_detector_follows_the_phase_plan_with_ap50(data):
    model, lines = small_ssd(), []
    schedule = Phased(l1=1e-3, sparsity_steps=2, tolerance=1.0, rounds=1,
                      phase_layers=[["backbone.*"], ["extras.*"]])
    task = DetectionTask()
    pruned = prune(model, torch.rand(1, 3, 32, 32), "singh", schedule, Target(params=0.7), train_data=data.train,
                   val_data=data.val, loss_fn=task.loss_fn, eval_fn=task.evaluate, metric="AP50", log=lines.append,
                   history=(history := []))
    assert schedule.plan[0][0] == "backbone.0.0" and all(n.startswith("extras.") for n in schedule.plan[1])
    assert any(line.startswith("singh phase plan (front to back): phase 1: backbone.0.0") for line in lines)
    assert history and all("val_AP50" in r for r in history)
    assert [r["layers"][0].split(".")[0] for r in history] == ["backbone", "extras"][:len(history)]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert len(pruned.postprocess(pruned(torch.rand(2, 3, 32, 32)))) == 2


def test_bad_phase_plans_and_plans_emptying_a_layer_are_refused():
    with pytest.raises(ValueError, match="phase_layers must be a non-empty list"):
        Phased(phase_layers=["backbone.*"])
    with pytest.raises(ValueError, match="phase_layers must be a non-empty list"):
        Phased(phase_layers=[[]])
    from pycompress.prune import DependencyGraph

    model = small_ssd()
    graph = DependencyGraph(model, torch.rand(1, 3, 32, 32))
    group = graph.prunable_groups()[0]
    with pytest.raises(ValueError, match="would leave backbone.0.0.out with no channel"):
        graph.remove(set(group.units))


# ---------------------------------------------------------------------------- deployment
def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_pruned_detector_saves_and_reloads_with_weights_only(pruned_ssd, tmp_path):
    _, pruned = pruned_ssd
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    reloaded = load_pruned_state_dict(small_ssd(), torch.load(tmp_path / "pruned.pt", weights_only=True)).eval()
    x = torch.rand(2, 3, 32, 32)
    for a, b in zip(_outputs(pruned, x), _outputs(reloaded, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pruned_detector_compiles_and_exports(pruned_ssd):
    _, pruned = pruned_ssd
    x = torch.rand(2, 3, 32, 32)
    expected = _outputs(pruned, x)
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
    exported = torch.export.export(pruned, (x,)).module()
    for got in (_outputs(compiled, x), _outputs(exported, x)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


@needs_deploy
def test_pruned_detector_runs_in_onnx_runtime_like_pytorch(pruned_ssd, tmp_path):
    from pycompress.prune.deploy import export_onnx, onnx_latency, run_onnx

    _, pruned = pruned_ssd
    x = torch.rand(1, 3, 32, 32)
    path = export_onnx(pruned, x, str(tmp_path / "ssd.onnx"), output_names=["loc", "conf"])
    for a, b in zip(run_onnx(path, x), _outputs(pruned, x)):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-5)
    assert onnx_latency(path, (1, 3, 32, 32), runs=2) > 0


def test_block_sparse_layers_are_refused_by_name_before_the_onnx_exporter(pruned_ssd, tmp_path):
    from pycompress.prune.deploy import export_onnx
    from pycompress.sparsity import block_sparsify

    _, pruned = pruned_ssd
    sparse = block_sparsify(pruned, 0.5, block_size=(1, 1), include="backbone.3.0", inplace=False).model
    with pytest.raises(TypeError, match=r"layer 'backbone\.3\.0' \(BlockSparseConv2d\) runs a pycompress custom op"):
        export_onnx(sparse, torch.rand(1, 3, 32, 32), str(tmp_path / "sparse.onnx"))


def test_cli_prunes_a_detector_and_reports_ap50_and_the_phase_plan(tmp_path):
    import json

    from pycompress.cli import main
    from pycompress.config import PruneConfig, load_config

    (tmp_path / "ssd.toml").write_text('''
criterion = "singh"
target_params = 0.8
latency_batch_sizes = [1]
num_threads = 1
[model]
model = "pycompress.models.detection:build_detector"
kwargs = { name = "ssd", width = 4, image_size = 32 }
[data]
dataset = "pycompress.data:digit_detection_splits"
kwargs = { image_size = 32, num_images = { train = 16, val = 8, test = 8, unlabeled = 1 } }
[dense]
epochs = 0
[finetune]
epochs = 0
[singh]
sparsity_steps = 1
rounds = 1
tolerance = 1.0
phase_layers = [["backbone.*"], ["extras.*"]]
''')
    cfg = load_config(PruneConfig(), str(tmp_path / "ssd.toml"))
    assert cfg.singh.phase_layers == [["backbone.*"], ["extras.*"]] and cfg.task == "auto"
    out = tmp_path / "report.json"
    assert main(["prune", "--config", str(tmp_path / "ssd.toml"), "--task", "detection", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "detection" and report["metric"] == "AP50"
    assert report["phase_plan"][0][0] == "backbone.0.0" and report["phase_plan"][1][0] == "extras.0.0.0"
    for stage in ("dense", "pruned", "fine_tuned"):
        assert {"params", "macs", "AP50", "AP", "batch1_ms"} <= set(report[stage])
