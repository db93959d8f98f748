"""Shared benchmark helpers: interleaved timing, peak-memory probes and result rows.

Ratios are only meaningful inside one run (the machine is shared and noisy), so
every benchmark times its variants interleaved (A B C A B C ...) in one process
and reports the median of each.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds of each callable, timed round-robin after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_extra_bytes(code: str, setup: str, warmup: str = "") -> int:
    """Peak resident memory that `code` adds over what `setup` (and `warmup`) hold, in a
    fresh interpreter. The kernel's high-water mark (VmHWM) is reset after setup by
    writing 5 to /proc/self/clear_refs, so one-off warm-up costs do not count."""
    script = f"""
import torch
torch.set_num_threads({torch.get_num_threads()})
{setup}
{warmup}
def _rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = _rss("VmRSS:")
{code}
print(_rss("VmHWM:") - base)
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    from pycompress._extension import cpu_vector_bits

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, " \
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
