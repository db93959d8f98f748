"""Criteria against values computed by hand on tiny networks.

The Taylor network is linear so that its gradients are known in closed form:
``z_k = w_k x`` (conv1, 1x1, one input channel), ``out = sum_k v_k z_k`` (conv2)
and the loss ``C = sum(out)``. Then ``dC/dz_{n,k,m} = v_k`` and, for example n
with spatial mean ``xbar_n``,

    Theta_k = (1/N) sum_n |(1/M) sum_m v_k w_k x_{n,m}| = |v_k w_k| * mean_n |xbar_n|.
"""

import math

import pytest
import torch
from torch import nn

from pycompress.prune import (BNScale, DependencyGraph, FineTune, L1, L2, OneShot, Random, Singh, Target, Taylor,
                              TaylorWeight, get_criterion, prune)

W = torch.tensor([1.0, -2.0, 3.0])
V = torch.tensor([0.5, 0.5, -1.0])
# two examples of 2x2 with spatial means 1 and -2: mean |xbar| = 1.5
X = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]], [[[-2.0, -4.0], [0.0, -2.0]]]])


def _sum_loss(model, batch):
    return model(batch[0]).sum()


def _linear_net():
    net = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W.view(3, 1, 1, 1))
        net[1].weight.copy_(V.view(1, 3, 1, 1))
    return net


def _scores(crit, net, x=X, **kw):
    g = DependencyGraph(net, x)
    scores = crit.scores(g, **kw)
    (gi,) = [i for i, gr in enumerate(g.groups) if not gr.locked]
    return scores[gi]


def test_taylor_matches_hand_computation():
    raw = torch.tensor([0.5, 1.0, 3.0]) * 1.5
    got = _scores(Taylor(normalize=False), _linear_net(), data=[(X,)], loss_fn=_sum_loss)
    assert torch.allclose(got, raw.double(), atol=1e-12)
    got = _scores(Taylor(), _linear_net(), data=[(X,)], loss_fn=_sum_loss)  # per-layer l2 normalisation
    assert torch.allclose(got, (raw / raw.norm()).double(), atol=1e-12)


def test_taylor_takes_abs_per_example_and_accumulates_over_minibatches():
    # one batch of two or two batches of one: the same average of per-example |.|
    one = _scores(Taylor(normalize=False), _linear_net(), data=[(X,)], loss_fn=_sum_loss)
    two = _scores(Taylor(normalize=False), _linear_net(), data=[(X[:1],), (X[1:],)], loss_fn=_sum_loss)
    assert torch.allclose(one, two, atol=1e-12)
    # |mean over the batch| would cancel the two examples' signs (1 and -2 -> 0.5, not 1.5)
    assert not torch.allclose(one, torch.tensor([0.25, 0.5, 1.5]).double())


def test_taylor_flops_regulariser_subtracts_lambda_mflops():
    net = _linear_net()
    plain = _scores(Taylor(), net, data=[(X,)], loss_fn=_sum_loss)
    reg = _scores(Taylor(flops_lambda=1e-3), net, data=[(X,)], loss_fn=_sum_loss)
    # removing channel k removes 4 MACs in conv1 and 4 in conv2 per example (2x2 map)
    assert torch.allclose(plain - reg, torch.full((3,), 1e-3 * 8 / 1e6, dtype=torch.float64), atol=1e-15)


def test_taylor_weight_matches_hand_computation():
    # dC/dw_k = v_k sum(x), dC/dv_k = w_k sum(x): S_k = |w_k v_k sum x| + |v_k w_k sum x|
    total = float(X.sum())
    expected = 2 * (W * V).abs() * abs(total)
    got = _scores(TaylorWeight(), _linear_net(), data=[(X,)], loss_fn=_sum_loss)
    assert torch.allclose(got, expected.double(), atol=1e-10)


def test_filter_norms_match_hand_computation():
    net = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.5]]).view(3, 2, 1, 1))
    x = torch.rand(1, 2, 3, 3)
    assert torch.allclose(_scores(L1(), net, x), torch.tensor([3.0, 7.0, 0.5], dtype=torch.float64))
    assert torch.allclose(_scores(L2(), net, x), torch.tensor([math.sqrt(5), 5.0, 0.5], dtype=torch.float64))


def test_bn_scale_is_abs_gamma():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    assert torch.allclose(_scores(BNScale(), net, torch.rand(1, 1, 2, 2)),
                          torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))


def test_bn_scale_refuses_a_model_without_batchnorm():
    with pytest.raises(ValueError, match="could not score"):
        _scores(BNScale(), _linear_net())


def test_singh_uses_sparsity_of_layer_and_next_layer():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.Conv2d(3, 2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[0].view(-1)[:8] = 0  # filter 0: 8 of 9 weights zero in layer l
        net[1].weight[:, 2] = 0  # channel 2: every input kernel in layer l+1 is zero
        net[1].weight[0, 1] = 0  # channel 1: half its input kernels are zero
    crit = Singh(rho=0.8)
    scores = _scores(crit, net, torch.rand(1, 1, 4, 4))
    assert torch.allclose(scores, torch.tensor([1 - 8 / 9, 0.5, 0.0], dtype=torch.float64))
    assert crit.unimportant({0: scores})[0].tolist() == [0, 2]


def test_singh_refuses_a_dense_model():
    with pytest.raises(ValueError, match="sparsity-induction"):
        _scores(Singh(), _linear_net())


def test_random_is_seeded():
    a = _scores(Random(seed=3), _linear_net())
    b = _scores(Random(seed=3), _linear_net())
    assert torch.equal(a, b) and a.shape == (3,)


# ------------------------------------------------------------------ no silent no-op
def test_taylor_without_data_is_refused():
    with pytest.raises(ValueError, match="needs data"):
        _scores(Taylor(), _linear_net())
    with pytest.raises(ValueError, match="needs data"):
        _scores(TaylorWeight(), _linear_net())


def test_taylor_with_empty_data_is_refused():
    with pytest.raises(ValueError, match="no minibatch"):
        _scores(Taylor(), _linear_net(), data=[], loss_fn=_sum_loss)


def test_taylor_on_frozen_model_is_refused():
    net = _linear_net().requires_grad_(False).train()
    with pytest.raises(RuntimeError, match="no gradient"):
        _scores(Taylor(), net, data=[(X,)], loss_fn=_sum_loss)
    # the error leaves no activation hook behind and the training mode restored
    assert all(not m._forward_pre_hooks for m in net.modules()) and net.training


def test_taylor_with_zero_gradient_is_refused():
    with pytest.raises(RuntimeError, match="every score is zero"):
        _scores(Taylor(), _linear_net(), data=[(X,)], loss_fn=lambda m, b: 0.0 * m(b[0]).sum())


def test_taylor_does_not_touch_grads_or_bn_statistics():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1)).train()
    before = net[1].running_mean.clone()
    _scores(Taylor(), net, data=[(X,)], loss_fn=_sum_loss)
    assert torch.equal(net[1].running_mean, before)
    assert all(p.grad is None for p in net.parameters()) and net.training


def test_taylor_pruning_removes_the_lowest_ranked_channel():
    net = _linear_net()  # Theta ranks channel 0 lowest
    small = prune(net, X, "taylor", OneShot(score_batches=1, fine_tune=FineTune(batch_size=2)), Target(macs=0.7),
                  train_data=torch.utils.data.TensorDataset(X, X), loss_fn=_sum_loss)
    assert torch.equal(small[0].weight.flatten(), W[1:]) and torch.equal(small[1].weight.flatten(), V[1:])


def test_bad_criterion_arguments():
    with pytest.raises(ValueError, match="flops_lambda"):
        Taylor(flops_lambda=-1)
    with pytest.raises(ValueError, match="max_batches"):
        Taylor(max_batches=0)
    with pytest.raises(ValueError, match="max_batches"):
        TaylorWeight(max_batches=True)
    with pytest.raises(ValueError, match="rho"):
        Singh(rho=0)
    with pytest.raises(TypeError, match="criterion"):
        get_criterion(3)
    with pytest.raises(ValueError, match="criterion must be one of"):
        get_criterion("l3")
