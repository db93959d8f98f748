"""FusedLinearKDLoss against an eager reference that materialises the logits."""

import itertools

import pytest
import torch

from pycompress import FusedLinearKDLoss, fused_linear_kd_loss
from pycompress.ops.fused_linear_kd import auto_chunk_size, fused_linear_kd
from tests.test_kd_loss import _topk_teacher, reference_kd, reference_kd_topk

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float64: (1e-9, 1e-10)}


def _problem(dtype, rows=(29,), H=12, Ht=20, V=33, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    target = torch.randint(0, V, rows, generator=g)
    target.view(-1)[::6] = -100
    return dict(h_s=mk(*rows, H), w_s=mk(V, H) * 0.5, b_s=mk(V) if bias else None, h_t=mk(*rows, Ht),
                w_t=mk(V, Ht) * 0.5, b_t=mk(V) if bias else None, target=target)


def _leaves(p):
    return [x.clone().requires_grad_() if x is not None else None for x in (p["h_s"], p["w_s"], p["b_s"])]


def _grads(leaves):
    return [x.grad for x in leaves if x is not None]


def _compare(p, dtype, teacher_kind="hidden", chunk_size=None, tail="bucket", **kw):
    rtol, atol = TOL[dtype]
    h, w, b = _leaves(p)
    t_logits = p["h_t"].double() @ p["w_t"].double().t() + (p["b_t"].double() if p["b_t"] is not None else 0)
    if teacher_kind == "hidden":
        teacher = dict(teacher_hidden=p["h_t"], teacher_weight=p["w_t"], teacher_bias=p["b_t"])
    elif teacher_kind == "logits":
        teacher = dict(teacher_logits=t_logits.to(dtype))
    else:
        values, indices = _topk_teacher(t_logits.to(dtype), 5, kw.get("divergence", "forward_kl"))
        teacher = dict(teacher_logits=(values, indices))
    loss = fused_linear_kd_loss(h, w, target=p["target"], student_bias=b, chunk_size=chunk_size, topk_tail=tail,
                                **teacher, **kw)
    assert loss.dtype == dtype
    # reduction="none": per-row losses, backpropagated with an arbitrary per-row gradient
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss.backward(grad_out.to(dtype))

    h2, w2, b2 = (x.detach().double().requires_grad_() if x is not None else None for x in (p["h_s"], p["w_s"],
                                                                                           p["b_s"]))
    s_logits = h2 @ w2.t() + (b2 if b2 is not None else 0)
    if teacher_kind == "topk":
        ref = reference_kd_topk(s_logits, values, indices, p["target"], tail=tail, **kw)
    else:
        ref = reference_kd(s_logits, t_logits.to(dtype), p["target"], **kw)
    assert loss.shape == ref.shape
    ref.backward(grad_out)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    for got, want in zip(_grads([h, w, b]), _grads([h2, w2, b2])):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size,dtype,reduction", itertools.product(
    (1, 7, 29, None), (torch.float32, torch.bfloat16, torch.float64), ("none", "sum", "mean", "batchmean")))
def test_matches_eager_across_chunks_dtypes_reductions(chunk_size, dtype, reduction):
    _compare(_problem(dtype), dtype, chunk_size=chunk_size, temperature=2.0, alpha=0.6, reduction=reduction)


@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "jsd", "mse_logits"))
def test_matches_eager_for_each_divergence_3d(divergence):
    p = _problem(torch.float32, rows=(3, 7), bias=False)
    _compare(p, torch.float32, chunk_size=4, temperature=1.5, alpha=0.8, divergence=divergence, beta=0.3,
             reduction="batchmean")


@pytest.mark.parametrize("teacher_kind,tail", (("logits", "bucket"), ("topk", "bucket"), ("topk", "drop")))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_precomputed_and_topk_teachers(teacher_kind, tail, reduction):
    _compare(_problem(torch.float32), torch.float32, teacher_kind=teacher_kind, chunk_size=6, tail=tail,
             temperature=2.0, alpha=0.5, reduction=reduction)


def test_reduction_none_keeps_the_row_shape_and_zeroes_ignored_rows():
    p = _problem(torch.float32, rows=(3, 7))
    loss = fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], p["target"], temperature=2.0, alpha=0.5,
                                reduction="none", chunk_size=5)
    assert loss.shape == (3, 7)
    assert (loss[p["target"] == -100] == 0).all() and (loss[p["target"] != -100] > 0).all()
    total = fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], p["target"], temperature=2.0, alpha=0.5,
                                 reduction="sum", chunk_size=5)
    torch.testing.assert_close(loss.sum(), total)


def test_topk_with_k_equal_v_equals_dense_path():
    p = _problem(torch.float64)
    t_logits = p["h_t"] @ p["w_t"].t() + p["b_t"]
    values, indices = _topk_teacher(t_logits, 33, "forward_kl")
    kw = dict(target=p["target"], student_bias=p["b_s"], temperature=3.0, alpha=0.7, chunk_size=10)
    dense = fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], teacher_bias=p["b_t"], **kw)
    sparse = fused_linear_kd_loss(p["h_s"], p["w_s"], teacher_logits=(values, indices), **kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


def test_reduction_none_compiles_with_its_recompute_backward():
    p = _problem(torch.float32, rows=(6,), H=4, Ht=3, V=9)
    h, w, _ = _leaves(p)
    fn = lambda h_, w_: fused_linear_kd_loss(h_, w_, p["h_t"], p["w_t"], temperature=2.0,  # noqa: E731
                                             reduction="none", chunk_size=4)
    grad_out = torch.randn(6)
    eager = torch.autograd.grad(fn(h, w), (h, w), grad_out)
    compiled_fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled_fn(h, w)
    torch.testing.assert_close(loss, fn(h, w))
    for got, want in zip(torch.autograd.grad(loss, (h, w), grad_out), eager):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_float64(reduction):
    p = _problem(torch.float64, rows=(5,), H=4, Ht=3, V=6)
    h, w, b = _leaves(p)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: fused_linear_kd_loss(h_, w_, p["h_t"], p["w_t"], p["target"], student_bias=b_,
                                                temperature=2.0, alpha=0.5, chunk_size=2, reduction=reduction),
        (h, w, b))


def test_module_and_repr():
    p = _problem(torch.float32)
    m = FusedLinearKDLoss(temperature=2.0, alpha=0.5, reduction="mean", chunk_size=8)
    a = m(p["h_s"], p["w_s"], p["h_t"], p["w_t"], p["target"])
    b = fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], p["target"], temperature=2.0, alpha=0.5,
                             reduction="mean", chunk_size=8)
    assert torch.equal(a, b)
    assert "chunk_size=8" in repr(m) and "reduction='mean'" in repr(m)


def test_auto_chunk_size_bounds_the_buffers():
    rows = auto_chunk_size(8192, 32000, 4)
    assert 64 <= rows < 8192 and rows % 64 == 0
    assert 3 * rows * 32000 * 4 <= 128 << 20
    assert auto_chunk_size(10, 32000, 4) == 10
    assert auto_chunk_size(10_000, 50_000_000, 4) == 1


@pytest.mark.parametrize("reduction,compute_grad", (("mean", True), ("none", False)))
def test_opcheck(reduction, compute_grad):
    p = _problem(torch.float32, rows=(9,))
    h, w, b = _leaves(p)
    args = (h, w, b, p["h_t"], p["w_t"], p["b_t"], None, None, None, p["target"], 2.0, "forward_kl", 0.5, 0.5, True,
            reduction, -100, "bucket", 4, compute_grad)
    torch.library.opcheck(torch.ops.pycompress.fused_linear_kd_loss.default, args)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_path_under_interpreter():
    """The chunk loop driving the Triton KD kernel (the CUDA backend) matches the eager reference."""
    from pycompress.kernels.kd_loss import kd_loss_triton

    p = _problem(torch.float32, rows=(11,), V=19)
    loss, gh, gw, gb = fused_linear_kd(p["h_s"], p["w_s"], p["b_s"], p["h_t"], p["w_t"], p["b_t"], None, None, None,
                                       p["target"], 2.0, "forward_kl", 0.5, 0.5, True, "mean", -100, "bucket", 4,
                                       True, kd_impl=kd_loss_triton)
    h2, w2, b2 = (x.double().requires_grad_() for x in (p["h_s"], p["w_s"], p["b_s"]))
    t_logits = p["h_t"] @ p["w_t"].t() + p["b_t"]
    ref = reference_kd(h2 @ w2.t() + b2, t_logits, p["target"], temperature=2.0, alpha=0.5, reduction="mean")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got, want in ((gh, h2.grad), (gw, w2.grad), (gb, b2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_topk_path_under_interpreter():
    from pycompress.kernels.kd_loss import kd_loss_topk_triton

    p = _problem(torch.float32, rows=(7,), V=19, bias=False)
    t_logits = p["h_t"] @ p["w_t"].t()
    values, indices = _topk_teacher(t_logits, 4, "forward_kl")
    loss, gh, gw, _ = fused_linear_kd(p["h_s"], p["w_s"], None, None, None, None, None, values, indices, p["target"],
                                      2.0, "forward_kl", 0.5, 0.5, True, "sum", -100, "bucket", 3, True,
                                      kd_topk_impl=kd_loss_topk_triton)
    h2, w2 = (x.double().requires_grad_() for x in (p["h_s"], p["w_s"]))
    ref = reference_kd_topk(h2 @ w2.t(), values, indices, p["target"], temperature=2.0, alpha=0.5, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), w2.grad, rtol=1e-4, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------

def test_rejects_mismatched_vocabulary():
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"][:-1])


def test_rejects_hidden_size_mismatch():
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_kd_loss(p["h_s"], p["w_s"][:, :-1], p["h_t"], p["w_t"])
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"][:, :-1])


def test_rejects_two_or_no_teachers():
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match="either"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], teacher_logits=torch.zeros(29, 33))
    with pytest.raises(ValueError, match="either"):
        fused_linear_kd_loss(p["h_s"], p["w_s"])


def test_rejects_bad_reduction_and_chunk_size():
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearKDLoss(reduction="elementwise")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], chunk_size=0)


def test_rejects_bad_topk_teachers():
    p = _problem(torch.float32)
    logits = torch.randn(29, 33)
    values, indices = _topk_teacher(logits, 4, "forward_kl")
    with pytest.raises(ValueError, match="k = 34"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], teacher_logits=(torch.zeros(29, 34), torch.zeros(29, 34).long()))
    bad = indices.clone()
    bad[3, 1] = 40
    with pytest.raises(ValueError, match="outside"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], teacher_logits=(values, bad))
    bad = indices.clone()
    bad[3, 1] = bad[3, 0]
    with pytest.raises(ValueError, match="twice"):
        fused_linear_kd_loss(p["h_s"], p["w_s"], teacher_logits=(values, bad))
