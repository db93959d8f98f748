"""The one config path (file, flags, --set, Python give the same object), the shared CLI flags, and the cost model."""

import warnings

import pytest
import torch
from torch import nn

from pycompress.cli import build_parser
from pycompress.config import (BlockSparsifyConfig, DistillConfig, PruneConfig, TrainConfig, from_dict, load_config,
                               replace)
from pycompress.cost import count_flops, count_macs, count_params, layer_macs, measure_cost


def test_file_flags_and_python_build_the_same_prune_config(tmp_path):
    path = tmp_path / "prune.toml"
    path.write_text('criterion = "l1"\ntarget_flops = 0.5\nexclude = ["fc"]\n[dense]\nepochs = 3\n')
    from_file = load_config(PruneConfig(), str(path))
    from pycompress.cli.prune import load
    from_flags = load(build_parser().parse_args(["prune", "--criterion", "l1", "--target-flops", "0.5",
                                                 "--exclude", "fc", "--dense-epochs", "3"]))
    from_python = replace(PruneConfig(), criterion="l1", target_flops=0.5, exclude=["fc"], dense={"epochs": 3})
    assert from_file == from_flags == from_python
    assert from_file.dense.lr == 0.05 and from_file.dense.scheduler == "cosine"  # the rest of the default kept


def test_set_is_applied_after_flags_and_file(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("train:\n  epochs: 4\n")
    from pycompress.cli.distill import load
    args = build_parser().parse_args(["distill", "--config", str(path), "--epochs", "6", "--set", "train.epochs=8",
                                      "--seed", "5", "--no-progress"])
    cfg = load(args)
    assert (cfg.train.epochs, cfg.seeds, cfg.progress) == (8, [5], False)


@pytest.mark.parametrize("command", ["demo", "distill", "train-teacher", "prune", "block-sparsify"])
def test_every_subcommand_accepts_the_common_flags(command):
    args = build_parser().parse_args([command, "--set", "a.b=1", "--device", "cpu", "--seeds", "1,2", "--output",
                                      "r.json", "--no-progress", "--checkpoint-dir", "ck", "--resume", "--debug"])
    assert (args.overrides, args.device, args.seeds, args.output, args.progress, args.checkpoint_dir,
            args.resume) == (["a.b=1"], "cpu", [1, 2], "r.json", False, "ck", True)


def test_unknown_nested_key_and_wrong_type_are_named():
    with pytest.raises(ValueError, match=r"unknown config key 'finetune.learning_rate'; allowed keys in finetune"):
        from_dict(PruneConfig(), {"finetune": {"learning_rate": 0.1}})
    with pytest.raises(ValueError, match=r"'sparsities' must be List\[float\]"):
        from_dict(BlockSparsifyConfig(), {"sparsities": ["lots"]})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(TypeError, match="'epoch'"):
        replace(DistillConfig(), epoch=3)


def test_single_seed_workflows_refuse_several_seeds():
    with pytest.raises(ValueError, match="runs one seed.*--seed"):
        PruneConfig(seeds=[0, 1]).single_seed()


def test_config_module_needs_no_torch():
    import pycompress.config as config

    # building the parser and reading configs must work without torch or the extension
    assert "import torch" not in open(config.__file__).read()


# ---------------------------------------------------------------- cost
def test_flops_are_twice_the_macs_and_match_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    x = torch.randn(2, 3, 5, 5)
    conv = 8 * 5 * 5 * (3 * 3 * 3)   # out elements x in x kh x kw, per example
    linear = 10 * 200
    assert count_macs(model, x) == conv + linear
    assert count_flops(model, x) == 2 * (conv + linear)
    assert layer_macs(model, x) == {"0": 2 * conv, "3": 2 * linear}  # the whole batch of 2
    cost = measure_cost(model, x)
    assert cost.as_dict() == {"params": count_params(model), "macs": conv + linear, "flops": 2 * (conv + linear)}


def test_cost_agrees_with_the_pruning_graphs_mac_count():
    from pycompress.models import VGGStyle
    from pycompress.prune import count_params_flops

    model, x = VGGStyle(), torch.rand(1, 1, 8, 8)
    params, macs = count_params_flops(model, x)  # the graph's "flops" are MACs
    cost = measure_cost(model, x)
    assert (cost.params, cost.macs, cost.flops) == (params, macs, 2 * macs)


def test_block_sparse_layers_count_the_kept_blocks():
    from pycompress.nn import BlockSparseConv2d

    dense = nn.Conv2d(32, 32, 3, padding=1)
    sparse = BlockSparseConv2d.from_dense(dense, sparsity=0.75)
    x = torch.randn(1, 32, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_macs(sparse, x) == round(count_macs(dense, x) * sparse.density)


def test_resume_without_checkpoint_dir_is_refused_by_name(capsys):
    from pycompress.cli import main

    assert main(["prune", "--target-params", "0.5", "--resume"]) == 2
    assert "resume (--resume) needs checkpoint_dir (--checkpoint-dir)" in capsys.readouterr().err
