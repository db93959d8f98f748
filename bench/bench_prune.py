"""Latency of structurally pruned reference nets against dense, on CPU.

Prunes each model (untrained weights: latency does not depend on values) with
the l1 criterion at a given per-layer channel ratio, with and without
``round_to``, and times dense and pruned forwards *interleaved in one process*
(A B A B), reporting the median per batch size and the ratio. Rows (model, channel_ratio,
round_to, batch, params/FLOPs ratios, dense_ms, pruned_ms, speedup, threads) go to
bench/results/prune_latency.jsonl with the machine and commit (bench/common.py).

    python -m bench.bench_prune
"""

import argparse

import torch

from bench.common import write_rows
from pycompress.models import ResNetStyle
from pycompress.cost import compare_latency, measure_cost
from pycompress.prune import OneShot, Target, prune


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cases = [
        ("ResNetStyle(width=16) digits", lambda: ResNetStyle(), (1, 8, 8), 0.5, 1),
        ("ResNetStyle(width=64) 32x32", lambda: ResNetStyle(width=64), (1, 32, 32), 0.5, 1),
        ("ResNetStyle(width=64) 32x32", lambda: ResNetStyle(width=64), (1, 32, 32), 0.45, 1),
        ("ResNetStyle(width=64) 32x32", lambda: ResNetStyle(width=64), (1, 32, 32), 0.45, 16),
    ]
    rows = []
    for name, build, shape, ratio, round_to in cases:
        dense = build().eval()
        x = torch.randn(1, *shape)
        small = prune(dense, x, "l1", OneShot(), Target(channels=ratio, per_layer=True, round_to=round_to)).eval()
        lat = compare_latency({"dense": dense, "pruned": small}, shape, (1, 32), repeats=args.repeats)
        dc, sc = measure_cost(dense, x), measure_cost(small, x)
        (pd, fd), (ps, fs) = (dc.params, dc.flops), (sc.params, sc.flops)
        for bs in (1, 32):
            d, s = lat["dense"][f"batch{bs}_ms"], lat["pruned"][f"batch{bs}_ms"]
            rows.append({"model": name, "channel_ratio": ratio, "round_to": round_to, "batch": bs,
                         "params_ratio": pd / ps, "flops_ratio": fd / fs, "dense_ms": d, "pruned_ms": s,
                         "speedup": d / s, "threads": torch.get_num_threads()})
            print(f"{name:32s} ratio {ratio:.2f} round_to {round_to:2d} batch {bs:2d}: FLOPs {fd / fs:4.2f}x  "
                  f"dense {d:8.3f} ms  pruned {s:8.3f} ms  speedup {d / s:4.2f}x")
    print("written to", write_rows("prune_latency", rows))


if __name__ == "__main__":
    main()
