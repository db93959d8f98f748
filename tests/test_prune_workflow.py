"""The shared Trainer (resume equivalence, accumulation, checkpoints), the prune schedules,
the experiment runner and the ``pycompress prune`` command, on tiny models."""

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pycompress.data import digits_splits
from pycompress.models import MobileNetStyle, VGGStyle
from pycompress.prune import (FineTune, Iterative, Phased, Singh, Target, compare_latency, count_params_flops,
                              format_report, prune, run_experiment)
from pycompress.train import Trainer, atomic_save, fit


def small_splits():
    """A 320 / 128 / 128 subset of the digits splits: enough to train a few steps, fast on 2 cores."""
    full = digits_splits()
    return tuple(TensorDataset(*(t[:n] for t in part.tensors)) for part, n in zip(full, (320, 128, 128)))


@pytest.fixture(scope="module")
def digits():
    return digits_splits()._make(small_splits())


def _tiny_vgg():
    torch.manual_seed(0)
    return VGGStyle(widths=(8, 8), hidden=16, input_size=8)


def _params(model):
    return [p.detach().clone() for p in model.state_dict().values()]


# ------------------------------------------------------------------ Trainer
class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(digits, tmp_path):
    """Train 3 epochs uninterrupted; train again but crash inside step 4 (checkpoints every
    2 steps, so steps 3-4 are redone) and resume: every tensor must be equal."""
    kw = dict(epochs=3, batch_size=64, lr=0.05, grad_accum=2, seed=5, progress=False,
              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5))
    a = _tiny_vgg()
    nn.Module.add_module(a, "drop", nn.Dropout(0.3))  # exercises the saved torch RNG through dropout

    def step_a(model, batch):
        return nn.functional.cross_entropy(model.drop(model(batch[0])), batch[1])

    Trainer(a, digits.train, step_fn=step_a, **kw).fit()

    b = _tiny_vgg()
    nn.Module.add_module(b, "drop", nn.Dropout(0.3))
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # inside optimizer step 4 (5 batches of 64 per epoch, 2 per step)
            raise _Interrupt
        return step_a(model, batch)

    path = str(tmp_path / "ck.pt")
    with pytest.raises(_Interrupt):
        Trainer(b, digits.train, step_fn=crashing, checkpoint_path=path, checkpoint_every=2, **kw).fit()
    assert not os.path.exists(path + ".tmp")
    c = _tiny_vgg()
    nn.Module.add_module(c, "drop", nn.Dropout(0.3))
    t = Trainer(c, digits.train, step_fn=step_a, checkpoint_path=path, checkpoint_every=2, **kw)
    t.fit(resume=True)
    assert t.step == 3 * 3  # 3 steps per epoch (the last one holds a single batch)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(c)))


def test_max_steps_then_resume_equals_one_run(digits, tmp_path):
    kw = dict(epochs=2, batch_size=64, lr=0.05, seed=1, progress=False)
    a = _tiny_vgg()
    fit(a, digits.train, **kw)
    path = str(tmp_path / "ck.pt")
    b = _tiny_vgg()
    fit(b, digits.train, max_steps=7, checkpoint_path=path, **kw)
    c = _tiny_vgg()
    history = fit(c, digits.train, checkpoint_path=path, resume=True, eval_data=digits.val, **kw)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(c)))
    assert [h["epoch"] for h in history] == [1, 2] and "accuracy" in history[-1]


def test_grad_accumulation_equals_a_big_batch():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    big, small = nn.Linear(5, 3), nn.Linear(5, 3)
    small.load_state_dict(big.state_dict())
    fit(big, data, batch_size=32, lr=0.1, seed=0, progress=False)
    fit(small, data, batch_size=16, grad_accum=2, lr=0.1, seed=0, progress=False)
    # same permutation, same two optimizer steps: equal up to summation order
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_params(big), _params(small)))


def test_bf16_autocast_trains_on_cpu():
    data = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    model = nn.Linear(5, 3)
    before = model.weight.detach().clone()
    fit(model, data, batch_size=8, amp="bf16", progress=False)
    assert not torch.equal(before, model.weight)


def test_checkpoint_config_mismatch_is_refused(tmp_path):
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    path = str(tmp_path / "ck.pt")
    fit(nn.Linear(5, 3), data, batch_size=8, checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match="resuming would not reproduce.*train.batch_size: 8 -> 4"):
        fit(nn.Linear(5, 3), data, batch_size=4, checkpoint_path=path, resume=True, progress=False)


def test_atomic_save_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "x.pt")
    atomic_save({"a": torch.ones(2)}, path)
    assert torch.load(path)["a"].sum() == 2 and os.listdir(tmp_path / "sub") == ["x.pt"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(grad_accum=0), "grad_accum"),
    (dict(max_steps=0), "max_steps"), (dict(lr=0), "lr"), (dict(amp_dtype=torch.float32), "amp_dtype"),
    (dict(amp="fp16"), "CUDA"), (dict(amp="fp32"), "amp must be one of"), (dict(scheduler="step"), "scheduler"),
    (dict(checkpoint_every=3), "checkpoint_path"),
])
def test_bad_trainer_arguments(kwargs, match):
    data = TensorDataset(torch.randn(4, 5), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=match):
        Trainer(nn.Linear(5, 3), data, **kwargs)


def test_bad_trainer_types():
    with pytest.raises(TypeError, match="model"):
        Trainer("net", TensorDataset(torch.randn(4, 5)))
    with pytest.raises(TypeError, match="train_data"):
        Trainer(nn.Linear(5, 3), 42)
    with pytest.raises(ValueError, match="empty"):
        Trainer(nn.Linear(5, 3), TensorDataset(torch.randn(0, 5)))


# ------------------------------------------------------------------ schedules
def test_iterative_taylor_reaches_the_target_and_fine_tunes(digits):
    model = _tiny_vgg()
    x = digits.train[0][0].unsqueeze(0)
    history = []
    small = prune(model, x, "taylor", Iterative(3, score_batches=2, fine_tune=FineTune(steps=3)), Target(params=0.4),
                  train_data=digits.train, history=history)
    dense = count_params_flops(model, x)[0]
    assert count_params_flops(small, x)[0] <= 0.4 * dense
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[0]["params"] > history[1]["params"] > history[2]["params"]  # geometric steps
    assert all(h["target_reached"] for h in history)


def _singh_two_phases(digits, history):
    """(model, example input, pruned model): tiny VGG, Singh in two phases, one round."""
    model = _tiny_vgg()
    x = digits.train[0][0].unsqueeze(0)
    small = prune(model, x, Singh(rho=0.5), Phased(2, l1=1e-2, sparsity_steps=5, tolerance=0.05, rounds=1),
                  Target(params=0.5), train_data=digits.train, val_data=digits.val, history=history)
    return model, x, small


def test_singh_phases_induce_sparsity_then_prune(digits):
    history = []
    model, x, small = _singh_two_phases(digits, history)
    assert len(history) == 2 and all("threshold_multiplier" in h for h in history)
    assert history[0]["layers"] != history[1]["layers"]  # front-to-back layer sets
    assert count_params_flops(small, x)[0] < count_params_flops(model, x)[0]


def test_singh_phase_without_a_safe_threshold_prunes_nothing_and_goes_on(digits, monkeypatch):
    """When every threshold costs more than the tolerance (choose_threshold returns 0),
    no weight is zeroed: that phase removes nothing and the schedule continues,
    instead of the criterion stopping the run with 'no weight is zero'."""
    import pycompress.prune.pruner as wf

    real = wf.choose_threshold
    calls = []

    def first_phase_finds_none(model, weights, val_data, **kw):
        calls.append(1)
        return 0.0 if len(calls) == 1 else real(model, weights, val_data, **kw)

    monkeypatch.setattr(wf, "choose_threshold", first_phase_finds_none)
    history = []
    model, x, small = _singh_two_phases(digits, history)
    assert [(h["threshold_multiplier"], h["flagged"], h["removed_units"]) for h in history[:1]] == [(0.0, 0, 0)]
    assert len(history) == 2 and history[1]["removed_units"] > 0
    assert count_params_flops(small, x)[0] < count_params_flops(model, x)[0]


def test_choose_threshold_bisects_and_does_not_take_a_noisy_pass_above_a_failure():
    """Quality holds up to 1.0 x mean|w|, fails above, and passes again by noise at the largest
    multiplier: trying every multiplier and keeping the largest pass (the old rule) chose 4.0."""
    from pycompress.prune import choose_threshold
    from pycompress.prune.pruner import THRESHOLD_MULTIPLIERS

    layer = nn.Linear(64, 4, bias=False)
    with torch.no_grad():  # magnitudes spread so that every multiplier zeroes a different number of weights
        layer.weight.copy_(1.05 ** torch.arange(256.0).reshape(4, 64))
    w = layer.weight.detach().clone()
    multiplier_of = {int((w < a * w.mean()).sum()): a for a in THRESHOLD_MULTIPLIERS}
    assert len(multiplier_of) == len(THRESHOLD_MULTIPLIERS)
    tried = []

    def fake_eval(model, data):
        a = multiplier_of.get(int((model.weight == 0).sum()), 0.0)
        tried.append(a)
        return {"accuracy": 0.9 if a <= 1.0 or a == 4.0 else 0.5}

    a = choose_threshold(layer, [layer.weight], [0], tolerance=0.01, eval_fn=fake_eval)
    assert a == 1.0
    assert 4.0 not in tried and len(tried) <= 1 + 5  # the base, then about log2(17) bisection steps
    assert torch.equal(layer.weight, torch.where(w.abs() < w.abs().mean(), torch.zeros_like(w), w))


def test_choose_threshold_validates_the_candidate_and_refuses_bad_options():
    from pycompress.prune import choose_threshold

    layer = nn.Linear(8, 2)
    pruned_copies = []

    def candidate(model):  # the model the threshold would leave; here it always loses 0.2
        pruned_copies.append(model)
        return "pruned"

    def fake_eval(model, data):
        return {"accuracy": 0.7 if model == "pruned" else 0.9}

    w = layer.weight.detach().clone()
    assert choose_threshold(layer, [layer.weight], [0], tolerance=0.1, eval_fn=fake_eval, candidate=candidate) == 0.0
    assert pruned_copies and torch.equal(layer.weight, w)  # nothing qualified: the weights are restored
    assert choose_threshold(layer, [layer.weight], [0], tolerance=0.3, eval_fn=fake_eval, candidate=candidate) == 4.0
    with pytest.raises(ValueError, match="tolerance"):
        choose_threshold(layer, [layer.weight], [0], tolerance=-1, eval_fn=fake_eval)
    with pytest.raises(ValueError, match="multipliers"):
        choose_threshold(layer, [layer.weight], [0], multipliers=(0.5, 0), eval_fn=fake_eval)


def test_choose_threshold_measures_the_tolerance_from_the_reference():
    """A candidate that retrains is compared with the model given the same steps, not with the
    model before them: here retraining alone is worth 0.2, so a candidate at 0.95 is a loss."""
    from pycompress.prune import choose_threshold

    layer, trained = nn.Linear(8, 2), nn.Linear(8, 2)

    def fake_eval(model, data):  # the layer as it is: 0.8; retrained alone: 1.0; a retrained candidate: 0.95
        return {"accuracy": 1.0 if model is trained else 0.95 if model == "candidate" else 0.8}

    kw = dict(eval_fn=fake_eval, candidate=lambda m: "candidate")
    assert choose_threshold(layer, [layer.weight], [0], tolerance=0.1, **kw) == 4.0  # against 0.8: all pass
    assert choose_threshold(layer, [layer.weight], [0], tolerance=0.01, reference=trained, **kw) == 0.0  # against 1.0


def test_singh_recovery_steps_retrain_every_candidate_and_the_reference_alike(digits, monkeypatch):
    import pycompress.prune.pruner as wf

    real, steps = wf._fine_tune, []

    def counting(model, train_data, n, **kw):
        steps.append((n, kw["seed"]))
        return real(model, train_data, n, **kw)

    monkeypatch.setattr(wf, "_fine_tune", counting)
    model, x = _tiny_vgg(), digits.train[0][0].unsqueeze(0)
    history = []
    prune(model, x, Singh(rho=0.5), Phased(1, l1=1e-2, sparsity_steps=5, tolerance=0.05, rounds=1, recovery_steps=2),
          Target(params=0.5), train_data=digits.train, val_data=digits.val, history=history)
    recovery = [seed for n, seed in steps if n == 2]
    assert len(recovery) >= 2 and len(set(recovery)) == 1  # the reference and each candidate, same minibatches
    with pytest.raises(ValueError, match="recovery_steps"):
        Phased(recovery_steps=-1)


def test_singh_sparsifies_the_layers_reading_a_phase_too_but_not_a_locked_head():
    """Singh's statistics read layer l (producing a unit) and l+1 (reading it): both are in the L1
    penalty and the threshold of the phase, unless l+1 is a head whose outputs are locked."""
    from pycompress.prune import DependencyGraph
    from pycompress.prune.pruner import _phase_weights

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.Conv2d(5, 3, 3))
    graph = DependencyGraph(model, torch.rand(1, 1, 12, 12))
    first, second = graph.prunable_groups()
    assert [id(w) for w in _phase_weights(graph, [first])] == [id(model[0].weight), id(model[3].weight)]
    assert [id(w) for w in _phase_weights(graph, [second])] == [id(model[3].weight)]


def test_singh_needs_validation_data(digits):
    with pytest.raises(ValueError, match="val_data"):
        prune(_tiny_vgg(), torch.rand(1, 1, 8, 8), "singh", target=Target(params=0.5), train_data=digits.train)


def test_run_experiment_reports_and_resumes_after_pruning(digits, tmp_path):
    x = digits.train[0][0].unsqueeze(0)
    kw = dict(dense_epochs=1, finetune_epochs=1, criterion="l1", target_params=0.5, checkpoint_dir=str(tmp_path),
              log=lambda s: None, latency_batch_sizes=(1,), model_factory=_tiny_vgg)
    first = run_experiment(_tiny_vgg(), x, digits.train, digits.val, digits.test, **kw)
    assert set(tmp_path.iterdir()) >= {tmp_path / "dense.pt", tmp_path / "pruned.pt", tmp_path / "finetune.pt"}
    for stage in ("dense", "pruned", "fine_tuned"):
        assert {"params", "flops", "accuracy", "batch1_ms", "threads"} <= set(first[stage])
    assert first["pruned"]["params"] <= 0.5 * first["dense"]["params"]
    again = run_experiment(_tiny_vgg(), x, digits.train, digits.val, digits.test, resume=True, **kw)
    assert again["fine_tuned"]["accuracy"] == first["fine_tuned"]["accuracy"]
    assert all(torch.equal(p, q) for p, q in zip(_params(first["model"]), _params(again["model"])))
    table = format_report(first)
    assert "fine_tuned" in table and "x)" in table


def test_run_experiment_reports_every_singh_phase(digits):
    x = digits.train[0][0].unsqueeze(0)
    report = run_experiment(_tiny_vgg(), x, digits.train, digits.val, digits.test, criterion="singh",
                            target_params=0.5, finetune_epochs=0, report_steps=True, latency_batch_sizes=(1, 2),
                            singh={"phases": 2, "l1": 1e-2, "sparsity_steps": 5, "tolerance": 0.05, "rounds": 1,
                                   "rho": 0.5}, log=lambda s: None)
    assert report["history"]
    for record in report["history"]:
        assert {"params", "macs", "accuracy", "batch1_ms", "batch2_ms"} <= set(record["stage"])
        assert record["stage"]["params"] == record["params"] and "val_accuracy" in record
    assert report["history"][-1]["stage"]["params"] == report["pruned"]["params"]
    assert "step 1" in format_report(report)


def test_compare_latency_reports_every_model_and_batch():
    out = compare_latency({"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}, (4,), batch_sizes=(1, 3), repeats=2,
                          warmup=1)
    assert set(out) == {"a", "b"} and set(out["a"]) == {"threads", "batch1_ms", "batch3_ms"}
    assert out["a"]["threads"] == torch.get_num_threads()



def test_interleaved_medians_times_round_robin_after_untimed_warmup():
    from pycompress.cost import interleaved_medians

    calls = []
    out = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5 and set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    for bad in ({"repeats": 0}, {"warmup": -1}, {"repeats": True}):
        with pytest.raises(ValueError, match="repeats|warmup"):
            interleaved_medians({"a": lambda: None}, **bad)
    with pytest.raises(ValueError, match="repeats"):
        compare_latency({"a": nn.Linear(4, 4)}, (4,), batch_sizes=(), repeats=0)

# ------------------------------------------------------------------ CLI
def test_cli_on_a_user_model_and_dataset_given_by_import_path(tmp_path, capsys):
    from pycompress.cli.prune import main

    out = tmp_path / "r.json"
    save = tmp_path / "m.pt"
    rc = main(["--model", "pycompress.models:MobileNetStyle", "--data", "test_prune_workflow:small_splits",
               "--criterion", "bn_scale", "--target-flops", "0.6", "--dense-epochs", "1", "--finetune-epochs", "1",
               "--output", str(out), "--save", str(save)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["fine_tuned"]["flops"] <= 0.6 * report["dense"]["flops"]
    assert all(report[s]["flops"] == 2 * report[s]["macs"] for s in ("dense", "pruned", "fine_tuned"))
    assert report["config"]["model"]["model"] == "pycompress.models:MobileNetStyle"
    assert "fine_tuned" in capsys.readouterr().out
    from pycompress.prune import load_pruned_state_dict
    reloaded = load_pruned_state_dict(MobileNetStyle(), torch.load(save, weights_only=True))
    assert count_params_flops(reloaded, torch.rand(1, 1, 8, 8))[0] == report["fine_tuned"]["params"]


def test_cli_continues_pruning_from_a_pruned_state_dict(tmp_path):
    """--weights takes an earlier run's --save: the report's dense stage is that pruned model."""
    from pycompress.cli.prune import main

    common = ["--model", "pycompress.models:MobileNetStyle", "--data", "test_prune_workflow:small_splits",
              "--criterion", "l1", "--target-params", "0.7", "--dense-epochs", "0", "--finetune-epochs", "0"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert main(common + ["--output", str(first), "--save", str(tmp_path / "a.pt")]) == 0
    assert main(common + ["--weights", str(tmp_path / "a.pt"), "--output", str(second),
                          "--save", str(tmp_path / "b.pt")]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["dense"]["params"] == a["fine_tuned"]["params"] and b["dense"]["accuracy"] == a["fine_tuned"]["accuracy"]
    assert b["fine_tuned"]["params"] <= 0.7 * b["dense"]["params"]


def test_cli_is_registered_and_refuses_missing_target(capsys):
    from pycompress.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["prune"][0] == "pycompress.cli.prune"
    assert main(["prune", "--dense-epochs", "0", "--finetune-epochs", "0",
                 "--data", "test_prune_workflow:small_splits"]) == 2
    assert "pycompress prune: error: give exactly one of target_params" in capsys.readouterr().err
    assert main(["prune", "--model", "nomodule", "--target-params", "0.5"]) == 2
    assert "model.model must be an import path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="import path"):
        main(["prune", "--model", "nomodule", "--target-params", "0.5", "--debug"])


def test_old_prune_cli_module_still_runs_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("pycompress.prune.cli", None)
    with pytest.warns(DeprecationWarning, match="pycompress.cli.prune"):
        old = importlib.import_module("pycompress.prune.cli")
    from pycompress.cli.prune import main
    assert old.main is main


def test_run_experiment_config_and_old_keywords_build_the_same_config():
    from pycompress.config import PruneConfig, TrainConfig
    from pycompress.prune.workflow import _prune_config

    new = PruneConfig(target_params=0.5, seeds=[3], dense=TrainConfig(epochs=2, lr=0.05, weight_decay=1e-4,
                                                                        scheduler="cosine", batch_size=16),
                      finetune=TrainConfig(epochs=20, lr=0.01, weight_decay=1e-4, scheduler="cosine", batch_size=16))
    old = _prune_config(None, dict(target_params=0.5, seed=3, dense_epochs=2, batch_size=16))
    assert old == new


def test_units_per_step_removes_a_few_maps_per_iteration_until_the_target(digits):
    model = _tiny_vgg()
    x = digits.train[0][0].unsqueeze(0)
    history = []
    small = prune(model, x, "taylor", Iterative(units_per_step=2, score_batches=1, fine_tune=FineTune(steps=1)),
                  Target(macs=0.6), train_data=digits.train, history=history)
    assert all(h["removed_units"] <= 2 for h in history) and len(history) > 1
    assert history[-1]["target_reached"] and not any(h["target_reached"] for h in history[:-1])
    assert count_params_flops(small, x)[1] <= 0.6 * count_params_flops(model, x)[1]
    with pytest.raises(ValueError, match="units_per_step"):
        prune(model, x, "l1", Iterative(units_per_step=2), Target(channels=0.5))
