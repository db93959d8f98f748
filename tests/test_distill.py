"""Distillation strategies, MUNGE generators, the workflow, its config and CLI.

Models are tiny linear / small-conv nets on 8x8 inputs so the whole file runs
in seconds; the digits-scale experiments live in scripts/distill_experiments.py.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pycompress.cli import main
from pycompress.distill import STRATEGIES, Ensemble, Hinton, LogitRegression, Munge, NoisyTeacher, distill

# the classification strategies (mehta_ozturk, a detection one, has tests/test_detection_distill.py)
CLASSIFICATION = sorted(n for n, c in STRATEGIES.items() if c.task == "classification")
from pycompress.cli.common import load_data, load_object
from pycompress.config import DistillConfig, apply_overrides, from_dict, load_config, read_config_file
from pycompress.distill.munge import make_transfer_set, munge, nearest_neighbours, noise_mixup
from pycompress.distill.workflow import _with_teacher_logits
from pycompress.train import Trainer


def linear_net(num_classes=10, scale=1.0, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    with torch.no_grad():
        net[1].weight.mul_(scale)
    return net


def small_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():  # learnable labels: those of a fixed linear "ground truth"
        y = linear_net(scale=5.0, seed=99)(x - 0.5).argmax(1)
    return TensorDataset(x, y)


def tiny_splits():
    """A user data set given by import path (``tests.test_distill:tiny_splits``) in the CLI test."""
    return {"train": small_data(96), "val": small_data(32, seed=1), "test": small_data(32, seed=2)}


def teachers_for(strategy):
    ts = [linear_net(scale=5.0, seed=10 + i) for i in range(strategy.teachers_required)]
    for t in ts:
        t.eval().requires_grad_(False)
    return ts


def strategy_loss(strategy, data, model, teacher_fn, seed=0):
    torch.manual_seed(seed)  # the noisy teacher's rows and noise
    with torch.no_grad():
        return float(strategy.step_fn(teacher_fn)(model, data[:]))


# ---------------------------------------------------------------- strategies
@pytest.mark.parametrize("name", CLASSIFICATION)
def test_strategy_reduces_its_loss(name):
    strategy = STRATEGIES[name]()
    teachers = teachers_for(strategy)

    def teacher_fn(x):
        return strategy.teacher_logits(teachers, x)

    data = strategy.prepare(small_data(), teacher_fn, seed=0)
    student = linear_net(seed=1)
    before = strategy_loss(strategy, data, student, teacher_fn)
    Trainer(student, data, step_fn=strategy.step_fn(teacher_fn), epochs=15, batch_size=32, lr=0.05,
            progress=False).fit()
    after = strategy_loss(strategy, data, student, teacher_fn)
    assert after < 0.85 * before, (before, after)  # clear decrease; the floor is not 0 (teachers disagree)


def test_hinton_matches_kl_plus_ce_reference():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    T, a = 3.0, 0.3
    ref = a * T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                               reduction="batchmean") + (1 - a) * F.cross_entropy(s, y)
    got = Hinton(temperature=T, alpha=a).loss(s, t, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_logits_strategy_is_half_squared_error():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    got = LogitRegression().loss(s, t, torch.zeros(16, dtype=torch.long))
    torch.testing.assert_close(got, 0.5 * ((s - t) ** 2).sum(1).mean())


def test_noisy_teacher_without_noise_equals_logit_regression():
    torch.manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    model, teacher = linear_net(seed=1), linear_net(seed=2)
    batch = (x, y, teacher(x).detach())
    torch.testing.assert_close(NoisyTeacher(sigma=0.0, fraction=0.5).step_fn(teacher, cached=True)(model, batch),
                               LogitRegression().step_fn(teacher, cached=True)(model, batch))


def test_noisy_teacher_perturbs_only_its_fraction_of_rows():
    torch.manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    teacher = linear_net(seed=2)
    t = teacher(x).detach()
    s = torch.zeros(20, 10, requires_grad=True)
    strategy = NoisyTeacher(sigma=0.5, fraction=0.25)
    strategy.step_fn(teacher, cached=True)(lambda _: s, (x, y, t)).backward()
    # d/ds of (1/N) sum 1/2 ||s - t~||^2 at s = 0 is -t~/N: rows with t~ != t are the noisy ones
    changed = ~torch.isclose(-s.grad * 20, t).all(1)
    assert int(changed.sum()) == 5


def test_ensemble_targets_are_the_mean_tempered_probabilities():
    x = torch.rand(8, 1, 8, 8)
    teachers = [linear_net(scale=3.0, seed=i) for i in range(3)]
    T = 2.0
    logits = Ensemble(temperature=T).teacher_logits(teachers, x)
    expected = torch.stack([torch.softmax(t(x) / T, -1) for t in teachers]).mean(0)
    torch.testing.assert_close(torch.softmax(logits / T, -1), expected)


def test_munge_prepare_labels_union_with_teacher():
    data = small_data(40)
    teacher = linear_net(seed=3)
    union = Munge(transfer_factor=2.5).prepare(data, teacher, seed=0)
    x, t = union.tensors
    assert x.shape == (140, 1, 8, 8)
    torch.testing.assert_close(x[:40], data.tensors[0])
    torch.testing.assert_close(t, teacher(x).detach())


# ---------------------------------------------------------------- generators
def test_nearest_neighbours_matches_brute_force():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(x, x) + torch.diag(torch.full((50,), math.inf))
    assert torch.equal(nearest_neighbours(x, chunk=16), d.argmin(1))


def test_munge_swaps_toward_the_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g)
    nn_idx = nearest_neighbours(x)
    out = munge(x, 30, p=0.5, s=1e6, generator=g)  # s huge: swapped values are the neighbour's, nearly exact
    kept = torch.isclose(out, x)
    swapped = torch.isclose(out, x[nn_idx], atol=1e-4)
    assert bool((kept | swapped).all())
    assert 0.3 < float((swapped & ~kept).float().mean()) < 0.7


def test_munge_size_and_passes():
    x = torch.randn(10, 3)
    assert munge(x, 25, generator=torch.Generator().manual_seed(0)).shape == (25, 3)
    assert munge(x, 0).shape == (0, 3)


def test_noise_mixup_is_deterministic_given_generator():
    x = torch.rand(12, 1, 8, 8)
    a = noise_mixup(x, 20, generator=torch.Generator().manual_seed(1))
    b = noise_mixup(x, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (20, 1, 8, 8) and torch.equal(a, b)


def test_transfer_set_munge_on_images_keeps_shape():
    x = torch.rand(12, 1, 8, 8)
    assert make_transfer_set(x, 7, "munge", generator=torch.Generator().manual_seed(0)).shape == (7, 1, 8, 8)


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["noisy_teacher", "munge"])
def test_resume_is_bit_identical(tmp_path, name):
    strategy = STRATEGIES[name](**({"transfer_factor": 1.0} if name == "munge" else {}))
    teacher = teachers_for(strategy)[0]
    data = strategy.prepare(_with_teacher_logits(small_data(), teacher) if name != "munge" else small_data(),
                            teacher, seed=0)
    kw = dict(step_fn=strategy.step_fn(teacher, cached=name != "munge"), batch_size=16, seed=3, progress=False,
              optimizer=lambda p: torch.optim.Adam(p, 1e-2))
    full = linear_net(seed=1)
    Trainer(full, data, epochs=3, **kw).fit()
    ckpt = str(tmp_path / "ckpt.pt")
    Trainer(linear_net(seed=1), data, epochs=3, max_steps=7, checkpoint_path=ckpt, **kw).fit()  # "killed" at 7
    resumed = linear_net(seed=5)  # any weights: the checkpoint replaces them
    Trainer(resumed, data, epochs=3, checkpoint_path=ckpt, **kw).fit(resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_workflow_resume_does_not_retrain_finished_runs(tmp_path):
    data = small_data()
    teacher = linear_net(scale=5.0, seed=9)
    kw = dict(seeds=[0], epochs=2, batch_size=32, checkpoint_dir=str(tmp_path), progress=False, print_table=False)
    first = distill(lambda: linear_net(seed=1), teacher, data, ["hinton", "noisy_teacher"], **kw)
    again = distill(lambda: linear_net(seed=1), teacher, data, ["hinton", "noisy_teacher"], resume=True, **kw)
    for label in ("baseline", "hinton", "noisy_teacher"):
        assert first.report["runs"][label]["accuracy"] == again.report["runs"][label]["accuracy"]
        for a, b in zip(first.students[label][0].parameters(), again.students[label][0].parameters()):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- workflow
def test_distill_report_and_table(tmp_path, capsys):
    d = small_data(120)
    report_path = tmp_path / "r.json"
    teachers = [linear_net(scale=5.0, seed=9), linear_net(scale=5.0, seed=8)]
    result = distill(lambda: linear_net(seed=1), teachers, d, CLASSIFICATION, eval_data=small_data(40, 1),
                     seeds=[0, 1], epochs=1, batch_size=32, progress=False, output=str(report_path),
                     strategy_options={"munge": {"transfer_factor": 1.0}})
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert set(report["runs"]) == {"baseline", *CLASSIFICATION}
    assert report["evaluated_on"] == "val" and len(report["runs"]["hinton"]["accuracy"]) == 2
    assert report["runs"]["munge"]["generator_used"] == "mixup"
    assert "student, no distillation" in table and "± " in table and "teacher[1]" in table
    assert len(result.students["logits"]) == 2


def test_cached_teacher_logits_train_like_a_live_teacher():
    kw = dict(seeds=[0], epochs=2, batch_size=16, baseline=False, progress=False, print_table=False)
    teacher = linear_net(scale=5.0, seed=9)
    live = distill(lambda: linear_net(seed=1), teacher, small_data(), "hinton", cache_teacher=False, **kw)
    cached = distill(lambda: linear_net(seed=1), teacher, small_data(), "hinton", cache_teacher=True, **kw)
    for a, b in zip(live.students["hinton"][0].parameters(), cached.students["hinton"][0].parameters()):
        torch.testing.assert_close(a, b)


def test_temperature_sweep_gets_distinct_labels():
    result = distill(lambda: linear_net(seed=1), linear_net(seed=9), small_data(), [Hinton(temperature=1.0),
                     Hinton(temperature=8.0)], seeds=[0], epochs=1, baseline=False, progress=False,
                     print_table=False)
    assert set(result.report["runs"]) == {"hinton(temperature=1.0)", "hinton(temperature=8.0)"}


# ---------------------------------------------------------------- bad configs
def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown strategy 'fitnets'.*hinton"):
        distill(linear_net(), linear_net(), small_data(), "fitnets")


def test_missing_teacher_is_rejected():
    with pytest.raises(ValueError, match="missing teacher"):
        distill(linear_net(), None, small_data(), "hinton")


def test_teacher_student_output_sizes_must_agree():
    with pytest.raises(ValueError, match="teacher has 7 outputs but the student has 10"):
        distill(linear_net(), linear_net(num_classes=7), small_data(), "logits", progress=False)


def test_ensemble_needs_two_teachers():
    with pytest.raises(ValueError, match="'ensemble' needs at least 2 teachers"):
        distill(linear_net(), linear_net(), small_data(), "ensemble")


def test_unknown_strategy_option_is_rejected():
    with pytest.raises(ValueError, match="unknown option 'temprature'.*allowed: temperature, alpha"):
        distill(linear_net(), linear_net(), small_data(), "hinton", strategy_options={"hinton": {"temprature": 2}})


def config_from_dict(data):
    return from_dict(DistillConfig(), data)


def test_config_unknown_top_level_key():
    with pytest.raises(ValueError, match=r"unknown config key 'epochs'; allowed keys: seeds, device, .*strategies"):
        config_from_dict({"epochs": 3})


def test_config_file_whose_top_level_is_not_a_mapping_is_rejected_by_name(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=f"config file '{path}' must hold a mapping.*got a list"):
        read_config_file(str(path))


def test_partial_section_keeps_the_workflows_own_defaults():
    cfg = config_from_dict({"teacher": {"train": {"lr": 0.01}}})
    assert (cfg.teacher.train.lr, cfg.teacher.train.epochs, cfg.train.epochs) == (0.01, 15, 30)


def test_python_api_and_config_share_defaults():
    import inspect

    from pycompress.distill.workflow import distill as distill_fn
    # distill() has no defaults of its own for training: DistillConfig's are the only ones
    assert "epochs" not in inspect.signature(distill_fn).parameters
    assert DistillConfig().train.epochs == 30 and DistillConfig().seeds == [0, 1, 2]


def test_config_unknown_nested_key():
    with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rate'; allowed keys in train: .*lr"):
        config_from_dict({"train": {"learning_rate": 0.1}})


def test_config_unknown_strategy_option_key():
    with pytest.raises(ValueError, match=r"'strategy.hinton.T'; allowed keys in strategy.hinton: temperature"):
        config_from_dict({"strategy": {"hinton": {"T": 4}}})


def test_config_unknown_strategy_name():
    with pytest.raises(ValueError, match="unknown strategy 'distil'"):
        config_from_dict({"strategies": ["distil"]})


def test_config_wrong_type():
    with pytest.raises(ValueError, match="'train.epochs' must be int, got 'ten'"):
        config_from_dict({"train": {"epochs": "ten"}})


def test_config_bad_import_path():
    with pytest.raises(ValueError, match="student.model must be an import path"):
        load_object("pycompress.models.student_cnn", "student.model")


def test_config_missing_module():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.models'"):
        load_object("no_such_pkg.models:net", "teacher.model")


def test_cli_missing_teacher(tmp_path, capsys):
    assert main(["distill", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pycompress distill: error: missing teacher" in err and "train-teacher" in err
    with pytest.raises(ValueError, match="missing teacher"):  # --debug: the exception itself
        main(["distill", "--output", str(tmp_path / "r.json"), "--debug"])


def test_cli_bad_config_file_names_it(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "nope.toml")]) == 2
    assert f"config file '{tmp_path / 'nope.toml'}' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- config files and CLI
def test_overrides_parse_toml_values():
    data = apply_overrides({}, ["strategy.hinton.temperature=8", "seeds=[0, 1]", "device=cpu",
                                "progress=false"])
    assert data == {"strategy": {"hinton": {"temperature": 8}}, "seeds": [0, 1], "device": "cpu",
                    "progress": False}
    cfg = config_from_dict(data)
    assert cfg.strategy["hinton"]["temperature"] == 8 and cfg.train.epochs == 30


def test_yaml_and_toml_configs_agree(tmp_path):
    (tmp_path / "c.toml").write_text('strategies = ["logits"]\n[train]\nlr = 0.1\n[strategy.munge]\np = 0.3\n')
    (tmp_path / "c.yaml").write_text("strategies: [logits]\ntrain:\n  lr: 0.1\nstrategy:\n  munge:\n    p: 0.3\n")
    toml = load_config(DistillConfig(), str(tmp_path / "c.toml"))
    assert toml == load_config(DistillConfig(), str(tmp_path / "c.yaml"))
    assert toml.train.lr == 0.1 and toml.strategies == ["logits"]


def test_load_data_accepts_digits_splits():
    train, val, test = load_data("pycompress.data:digits_splits")
    assert len(train) + len(val) + len(test) == 1797


def test_cli_train_teacher_then_distill(tmp_path, capsys):
    cfg = tmp_path / "distill.toml"
    cfg.write_text(f"""
strategies = ["hinton", "munge"]
seeds = [0]
progress = false
output = "{tmp_path / 'report.json'}"
[teacher]
model = "pycompress.models:VGGStyle"
kwargs = {{ widths = [8, 16], hidden = 32 }}
checkpoints = ["{tmp_path / 'teacher.pt'}"]
[data]
dataset = "tests.test_distill:tiny_splits"
[teacher.train]
epochs = 1
[train]
epochs = 1
[strategy.munge]
transfer_factor = 0.5
generator = "munge"
""")
    assert main(["train-teacher", "--config", str(cfg), "--output", str(tmp_path / "teacher.pt")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["distill", "--config", str(cfg), "--set", "strategy.hinton.temperature=2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"]["hinton"]["options"]["temperature"] == 2
    assert report["teacher"]["parameters"] > report["student"]["parameters"] == 1898
    assert report["runs"]["munge"]["generator_used"] == "munge"


def test_distill_runs_in_bf16_autocast_with_grad_accum():
    result = distill(lambda: linear_net(seed=1), linear_net(scale=5.0, seed=9), small_data(), "hinton", seeds=[0],
                     epochs=2, batch_size=16, grad_accum=2, amp="bf16", progress=False, print_table=False)
    assert result.report["training"]["amp"] == "bf16"
    # the report's accuracy is the returned student's, on the training set (no eval or test data given)
    from pycompress.train import evaluate_classifier
    student = result.students["hinton"][0]
    assert result.report["runs"]["hinton"]["accuracy"] == [evaluate_classifier(student, small_data())["accuracy"]]
    assert all(p.dtype == torch.float32 for p in result.students["hinton"][0].parameters())


def test_old_keyword_names_still_work_with_a_deprecation_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="report_path"):
        distill(lambda: linear_net(seed=1), linear_net(seed=9), small_data(), [], seeds=[0], epochs=1,
                progress=False, print_table=False, report_path=str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["baseline"]["accuracy"]


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'learning_rate'"):
        distill(linear_net(), linear_net(), small_data(), "hinton", learning_rate=0.1)


def test_baseline_only_run():
    result = distill(lambda: linear_net(seed=1), linear_net(seed=9), small_data(), [], seeds=[0], epochs=1,
                     progress=False, print_table=False)
    assert set(result.report["runs"]) == {"baseline"}


def test_no_strategy_and_no_baseline_is_rejected():
    with pytest.raises(ValueError, match="at least one strategy"):
        distill(linear_net(), linear_net(), small_data(), [], baseline=False)
