"""Prints the markdown table of the train-detector reports in results/detection/ (README and results README)."""

import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "detection")


def main(names):
    reports = {n: json.load(open(os.path.join(ROOT, f"{n}.json"))) for n in names}
    base = reports[names[0]]["macs"]
    print("| report | params | MACs (vs first) | test AP50 | test AP@[.5:.95] | training images/s | train time | "
          "latency b1 / b32 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in reports.items():
        lat = r["latency_ms"]
        ratio = f" ({base / r['macs']:.1f}x fewer)" if r["macs"] != base else ""
        print(f"| `{n}.json` | {r['params']:,} | {r['macs'] / 1e6:.1f} M{ratio} | "
              f"{r['test']['AP50']:.3f} | {r['test']['AP']:.3f} | {r['train']['images_per_second']:.1f} | "
              f"{r['train']['seconds'] / 60:.1f} min | {lat['batch1_ms']:.1f} / {lat['batch32_ms']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["yolo_teacher", "tiny_yolo", "deep_narrow_yolo"])
