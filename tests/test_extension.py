"""Op loading: pycompress imports without its compiled library, and the Triton ops are
registered so that tracing (make_fx, as torch.compile's AOTAutograd does) sees their kernels."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pycompress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def package_without_library(tmp_path_factory):
    """A copy of the package (kernels/ installed as pycompress.kernels) with no _C library."""
    root = tmp_path_factory.mktemp("no_C")
    shutil.copytree(os.path.join(ROOT, "pycompress"), root / "pycompress",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), root / "pycompress" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _run(root, *args):
    # The copy first on sys.path; TRITON_INTERPRET off so that triton is not imported either.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_and_pure_python_parts_work_without_the_library(package_without_library):
    script = textwrap.dedent("""
        import sys, torch
        import pycompress
        from pycompress import _extension
        assert pycompress.__file__.startswith(sys.argv[1]), pycompress.__file__
        assert not _extension.has_ops()
        from pycompress.prune import DependencyGraph
        from pycompress.train import Trainer
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
        print(len(DependencyGraph(model, torch.randn(1, 1, 8, 8)).prunable_groups()))
        try:
            pycompress.kd_loss(torch.randn(2, 5), torch.randn(2, 5))
        except RuntimeError as exc:
            print("ERROR", " ".join(str(exc).split()))
        print("triton" in sys.modules)
    """)
    res = _run(package_without_library, "-c", script, str(package_without_library))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert int(lines[0]) >= 1  # the conv-conv channel group
    error = next(line for line in lines if line.startswith("ERROR"))
    assert "pycompress::kd_loss" in error and "pip install --no-build-isolation -e ." in error
    assert lines[-1] == "False"  # no GPU, no interpreter: triton is never imported


def test_cli_help_works_without_the_library(package_without_library):
    res = _run(package_without_library, "-m", "pycompress", "--help")
    assert res.returncode == 0, res.stderr
    assert "distill" in res.stdout and "block-sparsify" in res.stdout


def test_every_op_wrapper_names_its_op_without_the_library(package_without_library):
    script = textwrap.dedent("""
        import torch
        from pycompress import functional as F
        boxes, scores = torch.rand(3, 4), torch.rand(3)
        calls = {
            "pycompress::kd_loss_topk": lambda: F.kd_loss(torch.randn(2, 5), (torch.zeros(2, 1), torch.zeros(2, 1,
                                                          dtype=torch.long))),
            "pycompress::nms": lambda: F.nms(boxes, scores, 0.5),
            "pycompress::batched_nms": lambda: F.batched_nms(boxes, scores, torch.zeros(3, dtype=torch.long), 0.5),
            "pycompress::fm_nms": lambda: F.fm_nms(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2, 2)),
            "pycompress::block_sparse_conv2d": lambda: F.block_sparse_conv2d(
                torch.randn(1, 2, 3, 3), torch.randn(1, 2, 1), torch.zeros(1, dtype=torch.long),
                torch.tensor([0, 1]), None, 1, 1),
        }
        for op, call in calls.items():
            try:
                call()
                print(op, "no error")
            except RuntimeError as exc:
                print(op, op in str(exc))
    """)
    res = _run(package_without_library, "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [w for op in ("kd_loss_topk", "nms", "batched_nms", "fm_nms", "block_sparse_conv2d")
                                  for w in (f"pycompress::{op}", "True")]


# --- Triton ops (under TRITON_INTERPRET=1 without a GPU) ----------------------------------------

TRITON_OPS = ["kd_loss", "kd_loss_topk", "block_sparse_conv2d", "fm_nms"]


@pytest.mark.triton
@pytest.mark.parametrize("name", TRITON_OPS)
def test_cuda_kernel_of_each_op_is_its_triton_op(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pycompress::{name}", "CUDA")
    assert hasattr(torch.ops.pycompress, f"{name}_triton")
    # The C++ op's CPU kernel stays the C++ one.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pycompress::{name}", "CPU")


def _triton_op_args(name, device="cpu"):
    torch.manual_seed(0)
    s = torch.randn(2, 9, device=device, requires_grad=True)
    t = torch.randn(2, 9, device=device)
    values, indices = t.log_softmax(-1).topk(3)
    target = torch.tensor([1, 4], device=device)
    return {
        "kd_loss": (s, t, target, 2.0, "forward_kl", 0.5, 0.7, True, "mean", -100, True),
        "kd_loss_topk": (s, values, indices, target, 2.0, "jsd", 0.5, 0.7, True, "sum", -100, "bucket", True),
        "block_sparse_conv2d": (torch.randn(1, 2, 4, 4, device=device, requires_grad=True),
                                torch.randn(2, 2, 2, device=device, requires_grad=True),
                                torch.tensor([0, 8], device=device), torch.tensor([0, 1, 2], device=device), None,
                                [3, 3], [1, 1], [1, 1], [1, 1], 4, False),
        "fm_nms": (torch.rand(1, 2, 3, 3, device=device), torch.rand(1, 2, 4, 3, 3, device=device), 3),
    }[name]


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_op_matches_the_cpp_op_with_gradients(name):
    args = _triton_op_args(name)
    extra = (None, 0.0, 1, 0, 16, "ieee") if name == "block_sparse_conv2d" else ()  # no residual, fp32 products as on CPU
    got = getattr(torch.ops.pycompress, f"{name}_triton")(*args, *extra)
    want = getattr(torch.ops.pycompress, name)(*args)
    first = (lambda x: x[0]) if isinstance(want, tuple) else (lambda x: x)
    if name == "fm_nms":
        assert torch.equal(got, want)
        return
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g_got = torch.autograd.grad(first(got).sum(), leaves)
    g_want = torch.autograd.grad(first(want).sum(), leaves)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck_triton_ops(name):
    # Under the interpreter the kernels cannot run on fake tensors (torch 2.13 hands the
    # interpreter their storage), so the fake and AOT checks need a GPU.
    utils = ("test_schema", "test_autograd_registration")
    if torch.cuda.is_available():
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.library.opcheck(getattr(torch.ops.pycompress, f"{name}_triton").default, _triton_op_args(name, device),
                          test_utils=utils)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter cannot trace fake tensors")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_tracing_a_triton_op_sees_its_kernel(name):
    """Under FunctionalTensorMode (what AOTAutograd runs for torch.compile) the op
    decomposes into its kernel launches instead of staying an opaque call."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    args = _triton_op_args(name, "cuda")
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(*ts):
        full = list(args)
        for i, x in zip(tensors, ts):
            full[i] = x
        return getattr(torch.ops.pycompress, f"{name}_triton")(*full)

    gm = make_fx(dispatch_functionalize(f, FunctionalTensorMode()), tracing_mode="fake")(
        *[args[i].detach() for i in tensors])
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("triton_kernel_wrapper" in x for x in targets), targets


def test_module_and_function_names_do_not_clash():
    import importlib

    assert importlib.import_module("pycompress.ops.detection").__name__ == "pycompress.ops.detection"
    assert callable(pycompress.functional.nms) and callable(pycompress.functional.apply_fm_nms)
