#!/usr/bin/env bash
# Builds pycompress from a clean clone of this repository's HEAD in every
# configuration we support and checks each build. Run it before submitting any
# change to setup.py or csrc/ (commit first: it builds HEAD, not the work tree).
#
#   torch 2.13.0 CPU          PYCOMPRESS_CUDA=auto  build, import, op registrations
#   torch 2.14.1 (CUDA 13)    PYCOMPRESS_CUDA=0     build, import, no CUDA kernel for nms
#                             PYCOMPRESS_CUDA=1     build, import, every op has a CUDA kernel
#                             PYCOMPRESS_CUDA=auto  the same as 1, then the whole test suite
#
# Needs a CUDA toolkit (nvcc) for the CUDA builds, no GPU, and about 6 GB for
# the CUDA torch. Idempotent: existing venvs and clones are reused (a clone is
# reset to HEAD and `git clean`ed before each build), ccache makes unchanged
# files free. Environment:
#   CHECK_DIR    where venvs, clones and logs go (default: <repo>/../pycompress-check-builds)
#   VENV_T213, VENV_T214   the venvs (default: $CHECK_DIR/venv-t213, $CHECK_DIR/venv-t214)
#   TORCH_T213   what to pip install for the CPU check (default torch==2.13.0; it must
#                resolve to a CPU build, as the +cpu wheel does here)
#   MAX_JOBS     parallel compile jobs (default 2)
set -euo pipefail
# The body is one { } block: bash parses it whole before running it, so editing this
# file while it runs cannot shift what it executes.
{

REPO=$(cd "$(dirname "$0")/.." && pwd)
CHECK_DIR=${CHECK_DIR:-$(dirname "$REPO")/pycompress-check-builds}
VENV_T213=${VENV_T213:-$CHECK_DIR/venv-t213}
VENV_T214=${VENV_T214:-$CHECK_DIR/venv-t214}
TORCH_T213=${TORCH_T213:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
# pip builds in a fresh /tmp/tmpXXXX folder each time and the flags have -g, so ccache
# would hash that folder into every key and never hit: CCACHE_NOHASHDIR.
export PATH=/usr/lib/ccache:$PATH CCACHE_BASEDIR=$(dirname "$REPO") CCACHE_NOHASHDIR=true
HEAD=$(git -C "$REPO" rev-parse HEAD)
mkdir -p "$CHECK_DIR/logs"

say() { printf '\n== %s\n' "$*"; }

# make_venv DIR TORCH_SPEC: a venv of its own (no system site-packages) with
# that torch, the build requirements and pycompress's runtime and test
# dependencies; pycompress itself is installed later with --no-deps.
make_venv() {
  local venv=$1 torch_spec=$2
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/pip" install -q "$torch_spec"
  fi
  # Everything pyproject.toml lists except torch, which stays the one installed above.
  mapfile -t deps < <("$venv/bin/python" - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
for req in meta["build-system"]["requires"] + meta["project"]["dependencies"] + meta["project"]["optional-dependencies"]["test"]:
    if not req.replace(" ", "").startswith("torch"):
        print(req)
PY
)
  "$venv/bin/pip" install -q "${deps[@]}"
  "$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
}

# clean_clone NAME: $CHECK_DIR/src-NAME at HEAD with no untracked or ignored files.
clean_clone() {
  local dir=$CHECK_DIR/src-$1
  [ -d "$dir/.git" ] || git clone -q "$REPO" "$dir"
  git -C "$dir" fetch -q "$REPO" HEAD
  git -C "$dir" checkout -q --detach "$HEAD"
  git -C "$dir" clean -xdfq
  echo "$dir"
}

# build VENV NAME PYCOMPRESS_CUDA: editable install from a clean clone; log in $CHECK_DIR/logs.
build() {
  local venv=$1 name=$2 mode=$3 src log start
  src=$(clean_clone "$name")
  log=$CHECK_DIR/logs/$name-cuda-$mode.log
  say "build: $name, PYCOMPRESS_CUDA=$mode (log: $log)"
  start=$SECONDS
  if ! (cd "$src" && PYCOMPRESS_CUDA=$mode "$venv/bin/pip" install -v --no-build-isolation --no-deps -e . >"$log" 2>&1); then
    tail -40 "$log"
    echo "FAILED: $name PYCOMPRESS_CUDA=$mode" >&2
    exit 1
  fi
  grep -o 'pycompress build: .*' "$log" | sort -u
  echo "built in $((SECONDS - start)) s"
}

# check_ops VENV EXPECT: imports pycompress (from outside the clone) and checks the
# dispatcher: EXPECT=cuda needs a CUDA kernel for every public op that has a CPU
# kernel; EXPECT=cpu needs none for the C++-only CUDA ops (nms, batched_nms).
check_ops() {
  (cd / && "$1/bin/python" - "$2" <<'PY'
import sys
import torch
import pycompress

expect = sys.argv[1]
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pycompress::") and "::_" not in n)
has = {op: {key: torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for key in ("CPU", "CUDA")} for op in ops}
for op in ops:
    print(f"  {op:36s} CPU={has[op]['CPU']!s:5s} CUDA={has[op]['CUDA']}")
if expect == "cuda":
    missing = [op for op in ops if has[op]["CPU"] and not has[op]["CUDA"]]
    assert not missing, f"ops with a CPU kernel but no CUDA kernel in a CUDA build: {missing}"
else:
    built = [op for op in ("pycompress::nms", "pycompress::batched_nms") if has[op]["CUDA"]]
    assert not built, f"a CPU-only build registered CUDA kernels for {built}"
print(f"import pycompress {pycompress.__version__} from {pycompress.__file__}: ok")
PY
  )
}

say "venv $VENV_T213: torch 2.13.0 CPU"
make_venv "$VENV_T213" "$TORCH_T213"
"$VENV_T213/bin/python" -c "import torch; assert torch.version.cuda is None, 'set TORCH_T213 to a CPU build of torch 2.13'"
build "$VENV_T213" t213 auto
check_ops "$VENV_T213" cpu

say "venv $VENV_T214: torch 2.14.1"
make_venv "$VENV_T214" "torch==2.14.1"
build "$VENV_T214" t214 0
check_ops "$VENV_T214" cpu
build "$VENV_T214" t214 1
check_ops "$VENV_T214" cuda
build "$VENV_T214" t214 auto
check_ops "$VENV_T214" cuda

say "test suite, torch 2.14.1, PYCOMPRESS_CUDA=auto build"
(cd "$CHECK_DIR/src-t214" && "$VENV_T214/bin/python" -m pytest -q -p no:cacheprovider)
say "all builds ok at $HEAD"
exit
}
