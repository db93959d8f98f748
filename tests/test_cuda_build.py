"""Cheap checks of the CUDA build that fit CI: no GPU and no full CUDA build.

* nvcc -c of every csrc/cuda/*.cu (they include no torch headers), with the
  toolkit setup.py would pick;
* the torch-facing bindings csrc/cuda/*.cpp compiled (-fsyntax-only) against
  the installed torch's CUDA headers, with the include folders setup.py uses.
  A CPU torch ships most of those headers but not the generated
  c10/cuda/impl/cuda_cmake_macros.h, so this one needs a CUDA torch and skips
  otherwise (scripts/check_builds.sh runs it against torch 2.14.1);
* setup.py's CUDA_HOME discovery on made-up toolkit folders.
The full builds are scripts/check_builds.sh's job.
"""

import importlib.util
import os
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# setup.py passes no -std and torch's cpp_extension adds this one (torch 2.13 and 2.14).
CXX_STD = "-std=c++20"


def _load_setup():
    spec = importlib.util.spec_from_file_location("pycompress_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


build = _load_setup()
CUDA_HOME = build.find_cuda_home()
TORCH_HAS_CUDA_HEADERS = os.path.isfile(
    os.path.join(os.path.dirname(torch.__file__), "include", "c10", "cuda", "impl", "cuda_cmake_macros.h"))
NO_TOOLKIT = "no CUDA toolkit found (setup.py's search; set CUDA_HOME)"


def _sources(ext):
    return sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(ext))


@pytest.mark.skipif(CUDA_HOME is None, reason=NO_TOOLKIT)
@pytest.mark.parametrize("source", _sources(".cu"))
def test_cuda_kernel_compiles(source, tmp_path):
    arch = build.default_cuda_arch_list(CUDA_HOME).split(";")[0].removesuffix("+PTX").replace(".", "")
    cmd = [os.path.join(CUDA_HOME, "bin", "nvcc"), "-c", CXX_STD, f"-arch=sm_{arch}", "-I", os.path.join(ROOT, "csrc"),
           os.path.join(CUDA_DIR, source), "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.skipif(CUDA_HOME is None, reason=NO_TOOLKIT)
@pytest.mark.skipif(not TORCH_HAS_CUDA_HEADERS,
                    reason=f"torch {torch.__version__} is a CPU build: it lacks c10/cuda/impl/cuda_cmake_macros.h")
@pytest.mark.parametrize("source", _sources(".cpp"))
def test_cuda_binding_compiles(source):
    includes = [f"-I{d}" for d in [*cpp_extension.include_paths(), os.path.join(CUDA_HOME, "include"),
                                   os.path.join(ROOT, "csrc")]]
    after = [arg for d in build.wheel_cuda_include_dirs(CUDA_HOME) for arg in ("-idirafter", d)]
    cmd = ["c++", "-fsyntax-only", CXX_STD, *includes, *after, os.path.join(CUDA_DIR, source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(CUDA_HOME is None, reason=NO_TOOLKIT)
@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a GPU is visible: torch builds for it")
def test_no_gpu_build_gets_the_default_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # unset for setup.py; restored afterwards
    build.choose_cuda_arch_list(CUDA_HOME)
    chosen = os.environ["TORCH_CUDA_ARCH_LIST"]
    assert chosen.endswith("+PTX")
    assert set(chosen.removesuffix("+PTX").split(";")) <= set(build.DEFAULT_CUDA_ARCH_LIST.replace("+PTX", "").split(";"))
    # Unset, torch's cpp_extension raised IndexError here: it queried device 0.
    assert any(flag.startswith("-gencode=arch=compute_") for flag in cpp_extension._get_cuda_arch_flags())


def _fake_toolkit(folder, headers=True):
    os.makedirs(folder / "bin")
    (folder / "bin" / "nvcc").write_text("")
    if headers:
        os.makedirs(folder / "include")
        (folder / "include" / "cuda_runtime_api.h").write_text("")
    return str(folder)


def test_explicit_cuda_home_without_headers_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", _fake_toolkit(tmp_path / "bare", headers=False))
    with pytest.raises(SystemExit, match="CUDA_HOME=.*bare is not a CUDA toolkit"):
        build.find_cuda_home()


def test_cuda_path_is_used_when_cuda_home_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUDA_PATH", _fake_toolkit(tmp_path / "toolkit"))
    assert build.find_cuda_home() == str(tmp_path / "toolkit")


def test_folder_above_a_wrapper_nvcc_is_skipped(tmp_path, monkeypatch):
    # /usr/local/bin/nvcc as a wrapper script: torch's guess /usr/local has bin/nvcc but no headers.
    wrapper_root = _fake_toolkit(tmp_path / "local", headers=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", os.path.join(wrapper_root, "bin"))
    os.chmod(os.path.join(wrapper_root, "bin", "nvcc"), 0o755)
    assert wrapper_root in build.cuda_home_candidates()
    assert build.find_cuda_home() != wrapper_root


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU torch")
def test_cpu_torch_ignores_a_stale_cuda_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", _fake_toolkit(tmp_path / "stale", headers=False))
    monkeypatch.setenv("PYCOMPRESS_CUDA", "auto")
    assert build.cuda_build_home() is None
