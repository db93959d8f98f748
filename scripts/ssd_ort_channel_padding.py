"""Why ONNX Runtime runs the Singh-pruned SSD slower than the dense one: a check of the channel-count guess.

The pruned SSD is compared with itself zero-padded: every pruned channel dimension of its state_dict
padded with zeros up to a multiple of 8 (capped at the dense width). The padded model computes the same
function (checked) with more parameters. Each ONNX Runtime measurement runs in a process of its own,
the three models alternated, five rounds, one thread.

    python scripts/ssd_ort_channel_padding.py --output results/detection/prune/ssd_singh_ort_padding.json
"""

import argparse
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

P = "results/detection/prune"


def padded_state_dict(pruned: dict, dense: dict, multiple: int) -> dict:
    """``pruned`` with each dimension smaller than the dense one zero-padded up to a multiple of ``multiple``."""
    out = {}
    for key, value in pruned.items():
        pad = [min(-(-n // multiple) * multiple, full) - n if n < full else 0
               for n, full in zip(value.shape, dense[key].shape)]
        out[key] = F.pad(value, [p for d in reversed(pad) for p in (0, d)]) if any(pad) else value
    return out


def main(argv=None):
    from pycompress.cli.common import atomic_write_json
    from pycompress.models.detection import build_detector
    from pycompress.prune import load_pruned_state_dict
    from pycompress.prune.deploy import export_onnx, onnx_latency

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default=f"{P}/ssd_dense.pt")
    p.add_argument("--pruned", default=f"{P}/ssd_singh.pt")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dense_sd, pruned_sd = torch.load(args.dense, weights_only=True), torch.load(args.pruned, weights_only=True)
    models = {"dense": build_detector("ssd", width=8),
              "pruned": load_pruned_state_dict(build_detector("ssd", width=8), pruned_sd),
              "pruned, padded to 8": load_pruned_state_dict(build_detector("ssd", width=8),
                                                            padded_state_dict(pruned_sd, dense_sd, 8))}
    models["dense"].load_state_dict(dense_sd)
    shape = (3, models["dense"].image_size, models["dense"].image_size)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(models["pruned"].eval()(x),
                                                                  models["pruned, padded to 8"].eval()(x)))
    given = sys.argv[1:] if argv is None else argv
    report = {"command": " ".join(["python scripts/ssd_ort_channel_padding.py", *given]), "threads": 1,
              "padded_model_matches_pruned": same, "models": {}}
    for name, m in models.items():
        convs = [mod.out_channels for n, mod in m.eval().named_modules()
                 if isinstance(mod, torch.nn.Conv2d) and "head" not in n]
        report["models"][name] = {"params": sum(t.numel() for t in m.parameters()), "conv_widths": convs}
    times = {name: {1: [], 32: []} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, m in models.items():
                for b in (1, 32):
                    path = export_onnx(m, torch.rand(b, *shape), os.path.join(tmp, f"{len(times[name][b])}{b}.onnx"))
                    times[name][b].append(onnx_latency(path, (b, *shape), threads=1))
    for name in models:
        for b in (1, 32):
            report["models"][name][f"batch{b}_ms"] = {"min": min(times[name][b]),
                                                      "median": statistics.median(times[name][b])}
        print(name, report["models"][name])
    atomic_write_json(report, args.output)


if __name__ == "__main__":
    main()
