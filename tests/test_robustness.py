"""Issue 17: empty batches, double backward, duplicate blocks, resume with changed settings
and errors that name their cause. Each test reproduces one reported case."""

import pytest
import torch

from pycompress import KDLoss, kd_loss
from pycompress.functional import fused_linear_kd_loss


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_kd_loss_empty_batch_has_zero_loss_and_empty_gradient(shape, reduction):
    s = torch.randn(shape, requires_grad=True)
    loss = kd_loss(s, torch.randn(shape), reduction=reduction)
    loss.sum().backward()
    assert loss.detach().sum().item() == 0.0
    assert s.grad.shape == s.shape


def test_kd_loss_module_empty_batch_trains_on():
    s = torch.randn(0, 5, requires_grad=True)
    KDLoss(temperature=2.0, alpha=0.5)(s, torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).backward()
    assert s.grad.shape == (0, 5)


def test_kd_loss_topk_empty_batch_backward():
    s = torch.randn(0, 6, requires_grad=True)
    values = torch.randn(0, 2).log_softmax(-1)
    kd_loss(s, (values, torch.zeros(0, 2, dtype=torch.long))).backward()
    assert s.grad.shape == (0, 6)


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_fused_linear_kd_loss_zero_rows_backward(teacher):
    h = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    kw = dict(teacher_hidden=torch.randn(0, 3), teacher_weight=torch.randn(5, 3)) if teacher == "hidden" else \
        dict(teacher_logits=torch.randn(0, 5))
    loss = fused_linear_kd_loss(h, w, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros(5, 4))


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_block_sparse_linear_empty_input_matches_nn_linear(lead):
    from pycompress.nn import BlockSparseLinear

    dense = torch.nn.Linear(16, 8)
    sparse = BlockSparseLinear.from_dense(dense, sparsity=0.75)
    x = torch.randn(*lead, 16)
    out = sparse(x)
    assert torch.equal(out, sparse.to_dense()(x))
    out.sum().backward()  # trains on, like nn.Linear
    assert torch.equal(sparse.values.grad, torch.zeros_like(sparse.values))


def _sparse_conv_with_duplicate_column():
    from pycompress.nn import BlockSparseConv2d

    torch.manual_seed(0)
    conv = BlockSparseConv2d.from_dense(torch.nn.Conv2d(8, 8, 3), block_size=(8, 8), sparsity=0.0,
                                        dense_threshold=1.0)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    state["col_idx"][1] = state["col_idx"][0]  # row 0 stores column 0 twice
    return conv, state


def test_block_sparse_state_dict_with_a_repeated_column_is_rejected_naming_the_row():
    conv, state = _sparse_conv_with_duplicate_column()
    with pytest.raises(ValueError, match="row 0 has column 0 then 0"):
        conv.load_state_dict(state)


def test_block_sparse_construction_rejects_a_repeated_column():
    conv, state = _sparse_conv_with_duplicate_column()
    with pytest.raises(ValueError, match="strictly increasing.*row 0"):
        conv._set_bsr(state["values"], state["col_idx"], state["row_ptr"])


def test_block_sparse_kernel_rejects_a_repeated_column():
    from pycompress.functional import block_sparse_conv2d

    conv, state = _sparse_conv_with_duplicate_column()
    with pytest.raises(ValueError, match="strictly increasing within each block row; row 0"):
        block_sparse_conv2d(torch.randn(1, 8, 5, 5), state["values"], state["col_idx"], state["row_ptr"], None, 3, 8)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse_logits")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_kd_loss_double_backward_gradgradcheck(divergence, reduction):
    torch.manual_seed(0)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([1, -100, 5, 0])
    fn = (lambda s: kd_loss(s, t, y, temperature=2.0, alpha=0.7, divergence=divergence, reduction=reduction))
    (g,) = torch.autograd.grad(fn(s).sum(), s, create_graph=True)
    assert g.requires_grad
    assert torch.autograd.gradgradcheck(fn, (s,))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "drop"])
def test_kd_loss_topk_double_backward_gradgradcheck(divergence, tail):
    torch.manual_seed(0)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    values, indices = torch.randn(3, 7, dtype=torch.float64).log_softmax(-1).topk(3)
    fn = (lambda s: kd_loss(s, (values, indices), temperature=1.5, divergence=divergence, topk_tail=tail))
    assert torch.autograd.gradgradcheck(fn, (s,))


def test_gradient_penalty_matches_the_reference_second_order_term():
    """d/ds ||d kd / ds||^2 against the same quantity from plain torch ops."""
    torch.manual_seed(1)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)

    def penalty_grad(loss_fn):
        (g,) = torch.autograd.grad(loss_fn(s), s, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), s)[0]

    reference = (lambda s: 4.0 * torch.nn.functional.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1),
                                                            reduction="batchmean", log_target=True))
    torch.testing.assert_close(penalty_grad(lambda s: kd_loss(s, t, temperature=2.0)), penalty_grad(reference))


@pytest.mark.parametrize("sigma", [float("inf"), float("nan")])
def test_non_finite_teacher_noise_is_rejected_by_name(sigma):
    with pytest.raises(ValueError, match="teacher_noise"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), teacher_noise=sigma)
    with pytest.raises(ValueError, match="teacher_noise"):
        KDLoss(teacher_noise=sigma)


def test_teacher_bias_with_teacher_logits_is_rejected():
    with pytest.raises(ValueError, match="teacher_bias"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(5, 4), teacher_logits=torch.randn(3, 5),
                             teacher_bias=torch.randn(5))


def test_empty_vocabulary_is_rejected_naming_v():
    with pytest.raises(ValueError, match="V >= 1"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(0, 4), teacher_logits=torch.randn(3, 0))


# ---------------------------------------------------------------- CLI and files
def test_cli_yaml_config_whose_top_level_is_a_list_is_one_line(tmp_path, capsys):
    from pycompress.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("- epochs: 1\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file '{cfg}' must hold a mapping" in err


def test_cli_bad_seeds_names_the_flag(capsys):
    from pycompress.cli import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "--seeds", "0,x"])
    assert e.value.code == 2
    assert "argument --seeds: expected comma-separated ints, got '0,x'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_cli_empty_or_truncated_teacher_checkpoint_names_the_file(tmp_path, capsys, content):
    from pycompress.cli import main

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(content)
    assert main(["distill", "--set", f'teacher.checkpoints=["{teacher}"]', "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"teacher checkpoint '{teacher}' is" in err


@pytest.mark.parametrize("cut", [0, 100])
def test_truncated_resume_checkpoint_names_the_file(tmp_path, cut):
    from torch.utils.data import TensorDataset

    from pycompress.config import TrainConfig
    from pycompress.train import Trainer

    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    path = tmp_path / "ckpt.pt"
    trainer = Trainer(torch.nn.Linear(3, 2), data, TrainConfig(epochs=1, batch_size=4), checkpoint_path=str(path),
                      progress=False)
    trainer.save_checkpoint()
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match=f"checkpoint '{path}' is (empty|truncated)"):
        trainer.load_checkpoint()


def test_distill_resume_with_changed_settings_is_refused_listing_each_key(tmp_path):
    from test_distill import linear_net, small_data

    from pycompress.distill import distill

    data, teacher = small_data(), linear_net(scale=5.0, seed=9)
    kw = dict(seeds=[0], epochs=1, batch_size=32, checkpoint_dir=str(tmp_path), progress=False, print_table=False,
              baseline=False)
    distill(lambda: linear_net(seed=1), teacher, data, ["hinton"], lr=0.01, **kw)
    with pytest.raises(ValueError, match=r"options\.temperature: 4\.0 -> 8\.0; .*train\.lr: 0\.01 -> 0\.05"):
        distill(lambda: linear_net(seed=1), teacher, data, ["hinton"], strategy_options={"hinton": {"temperature": 8.0}},
                lr=0.05, resume=True, **kw)
    # what cannot change the result may differ
    distill(lambda: linear_net(seed=1), teacher, data, ["hinton"], lr=0.01, resume=True,
            **{**kw, "progress": True, "output": str(tmp_path / "r.json")})


# ---------------------------------------------------------------- pruned state_dicts
def _two_convs():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))


def test_load_pruned_state_dict_with_contradicting_shapes_names_the_layer():
    from pycompress.prune.graph import load_pruned_state_dict

    state = _two_convs().state_dict()
    state["0.weight"], state["0.bias"] = state["0.weight"][:5], state["0.bias"][:5]  # conv 2 still expects 8
    with pytest.raises(ValueError, match="do not fit together at layer '2'"):
        load_pruned_state_dict(_two_convs(), state, example_inputs=torch.randn(1, 3, 8, 8))


def test_load_pruned_state_dict_larger_than_the_model_names_the_layer():
    from pycompress.prune.graph import load_pruned_state_dict

    big = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    with pytest.raises(ValueError, match=r"layer '0': the saved weight \(16, 3, 3, 3\) does not fit"):
        load_pruned_state_dict(_two_convs(), big.state_dict())


# ---------------------------------------------------------------- double backward of the other custom ops
@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_kd_loss_double_backward_gradgradcheck(teacher, reduction):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    h = torch.randn(5, 3, **f64, requires_grad=True)
    w = torch.randn(6, 3, **f64, requires_grad=True)
    b = torch.randn(6, **f64, requires_grad=True)
    y = torch.tensor([0, 5, -100, 2, 1])
    kw = {"hidden": dict(teacher_hidden=torch.randn(5, 4, **f64), teacher_weight=torch.randn(6, 4, **f64)),
          "logits": dict(teacher_logits=torch.randn(5, 6, **f64)),
          "topk": dict(teacher_logits=torch.randn(5, 6, **f64).log_softmax(-1).topk(3))}[teacher]

    def fn(h, w, b):
        return fused_linear_kd_loss(h, w, target=y, student_bias=b, temperature=2.0, alpha=0.6, reduction=reduction,
                                    chunk_size=2, **kw)

    assert torch.autograd.gradgradcheck(fn, (h, w, b))


@pytest.mark.parametrize("relu", [False, True])
def test_block_sparse_conv2d_double_backward_matches_dense(relu):
    """The op is float32 only, so gradgradcheck in float64 does not apply: compare the second-order
    gradients with those of F.conv2d on the same masked weight."""
    from pycompress.functional import block_sparse_conv2d
    from pycompress.nn import BlockSparseConv2d
    from pycompress.ops.block_sparse import bsr_to_dense

    torch.manual_seed(0)
    m = BlockSparseConv2d.from_dense(torch.nn.Conv2d(8, 8, 3, padding=1), block_size=(8, 8), sparsity=0.5)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    v = m.values.detach().clone().requires_grad_()
    b = torch.randn(8, requires_grad=True)

    def second_order(conv):
        out = conv(x, v, b)
        out = out.relu() if relu and conv is dense else out
        gx, gv = torch.autograd.grad(out.pow(2).sum(), (x, v), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gv.pow(2).sum(), (x, v, b))

    def sparse(x, v, b):
        return block_sparse_conv2d(x, v, m.col_idx, m.row_ptr, b, 3, 8, padding=1, relu=relu)

    def dense(x, v, b):
        return torch.nn.functional.conv2d(x, bsr_to_dense(v, m.col_idx, m.row_ptr, 8, 72).reshape(8, 8, 3, 3), b,
                                          padding=1)

    for got, want in zip(second_order(sparse), second_order(dense)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 2])
def test_fused_linear_kd_loss_zero_hidden_size_is_a_bias_only_linear(rows):
    b = torch.randn(3)
    t = torch.randn(rows, 3)
    got = fused_linear_kd_loss(torch.randn(rows, 0), torch.randn(3, 0), teacher_logits=t, student_bias=b,
                               reduction="sum")
    torch.testing.assert_close(got, kd_loss(b.expand(rows, 3), t, reduction="sum"))
