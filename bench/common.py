"""Shared benchmark helpers: interleaved timing, peak-memory probes and result rows.

Ratios are only meaningful inside one run (the machine is shared and noisy), so
every benchmark times its variants interleaved (A B C A B C ...) in one process
and reports the median of each.
"""

import json
import os
import platform
import subprocess
import sys

import torch

from pycompress.cost import interleaved_medians  # noqa: F401  (the benches' one timer)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rss_bytes(key: str = "VmRSS:") -> int:
    """This process's resident memory (VmRSS) or its high-water mark since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_python(script: str) -> str:
    """Runs `script` in a fresh interpreter with the repository on sys.path; returns its last stdout line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1]


def peak_extra_bytes(code: str, setup: str, warmup: str = "") -> int:
    """Peak resident memory that `code` adds over what `setup` (and `warmup`) hold, in a
    fresh interpreter; the high-water mark is reset after the warm-up, so one-off costs
    (compilation, first-call caches) do not count."""
    script = f"""
import torch
from bench.common import reset_peak_rss, rss_bytes
torch.set_num_threads({torch.get_num_threads()})
{setup}
{warmup}
reset_peak_rss()
base = rss_bytes()
{code}
print(rss_bytes("VmHWM:") - base)
"""
    return int(run_python(script))


def _cpu_model() -> str:
    """'AMD EPYC (family 25, model 17)' from /proc/cpuinfo: ratios against oneDNN differ by CPU generation."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def machine() -> str:
    from pycompress._extension import cpu_vector_bits

    return f"{_cpu_model()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, " \
           f"at::vec {cpu_vector_bits()}-bit, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def write_rows(name: str, rows: list) -> str:
    """Writes result rows (dicts with op, shape, dtype, baseline, ratio, ...) as JSON lines,
    tagged with the machine and commit; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    tag = {"machine": machine(), "commit": commit()}
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, **tag}) + "\n")
    return path
