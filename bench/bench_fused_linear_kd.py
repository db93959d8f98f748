"""FusedLinearKDLoss, forward + backward, against eager and torch.compile that materialise the logits.

Run: python -m pytest bench/bench_fused_linear_kd.py --benchmark-enable -s
Shape from issue #7: N=8192 tokens, H=1024, V=32000, fp32. Each variant runs in its own
subprocess, which reports its median time and its peak extra resident memory, so that
one variant's allocations cannot hide or inflate another's.
"""

import json
import subprocess
import sys

import pytest

from bench.common import write_rows

N, H, V, T = 8192, 1024, 32000, 2.0

_SCRIPT = """
import json, statistics, time, torch, torch.nn.functional as F
from pycompress import fused_linear_kd_loss
torch.manual_seed(0)
N, H, V, T = {N}, {H}, {V}, {T}
h_s = (torch.randn(N, H) * 0.1).requires_grad_()
w_s = (torch.randn(V, H) * 0.05).requires_grad_()
h_t = torch.randn(N, H) * 0.1
w_t = torch.randn(V, H) * 0.05
logits_t = h_t @ w_t.t()
topk = torch.log_softmax(logits_t, -1).topk(64, -1) if "{variant}" == "fused-topk64" else None
del logits_t

def eager(h_s, w_s, h_t, w_t):
    s = h_s @ w_s.t()
    with torch.no_grad():
        t = h_t @ w_t.t()
    return T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                             reduction="batchmean")

compiled = torch.compile(eager)
fns = {{
    "eager": lambda: eager(h_s, w_s, h_t, w_t),
    "torch.compile": lambda: compiled(h_s, w_s, h_t, w_t),
    "fused": lambda: fused_linear_kd_loss(h_s, w_s, h_t, w_t, temperature=T),
    "fused-topk64": lambda: fused_linear_kd_loss(h_s, w_s, teacher_logits=topk, temperature=T),
}}
fn = fns["{variant}"]

def step():
    h_s.grad = w_s.grad = None
    fn().backward()

step()
step()
h_s.grad = w_s.grad = None
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
times = []
for _ in range({repeats}):
    h_s.grad = w_s.grad = None
    start = time.perf_counter()
    fn().backward()
    times.append(time.perf_counter() - start)
print(json.dumps({{"seconds": statistics.median(times), "peak_extra_bytes": rss("VmHWM:") - base}}))
"""


def _run(variant, repeats=3):
    code = _SCRIPT.format(N=N, H=H, V=V, T=T, variant=variant, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_linear_kd_loss(benchmark):
    results = {v: _run(v) for v in ("fused", "eager", "torch.compile", "fused-topk64")}
    benchmark.pedantic(lambda: None, rounds=1)  # the timings above come from their own processes
    logits_bytes = N * V * 4
    print(f"\nfused linear KD fwd+bwd, N={N} H={H} V={V} fp32 (one logits tensor = {logits_bytes / 2**30:.2f} GiB)")
    print(f"{'variant':<15}{'s':>8}{'fused faster by':>17}{'peak extra GiB':>16}{'vs eager peak':>15}")
    rows = []
    for v, r in results.items():
        ratio = r["seconds"] / results["fused"]["seconds"]
        mem_ratio = r["peak_extra_bytes"] / results["eager"]["peak_extra_bytes"]
        print(f"{v:<15}{r['seconds']:>8.2f}{ratio:>16.2f}x{r['peak_extra_bytes'] / 2**30:>16.2f}{mem_ratio:>14.0%}")
        rows.append({"op": "fused_linear_kd_loss fwd+bwd", "shape": [N, H, V], "dtype": "float32", "baseline": v,
                     "seconds": round(r["seconds"], 3), "ratio": round(ratio, 3),
                     "peak_extra_gib": round(r["peak_extra_bytes"] / 2**30, 3), "peak_vs_eager": round(mem_ratio, 3)})
    print("written to", write_rows("fused_linear_kd_float32", rows))
    assert results["fused"]["peak_extra_bytes"] > 0
