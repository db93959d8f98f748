"""Prunes torchvision's classification zoo with pycompress and with Torch-Pruning, run the same way.

Random weights, eval mode, the L1 criterion, about 30 % of the channels of every prunable group
removed, the classifier kept. Per model and library: pruned or the error, whether the output
shape is kept, and the parameter and MAC ratios (both counted by ``pycompress.cost``, the same
counter for both libraries). Needs an environment with torchvision and torch-pruning (see
results/prune/README.md); pycompress itself is pure Python here (no compiled extension needed).

    PYTHONPATH=. python scripts/prune_zoo.py --out results/prune/zoo.json
    PYTHONPATH=. python scripts/prune_zoo.py --out results/prune/zoo.json --resume   # after an interruption
"""

import argparse
import json
import os
import tempfile
import time
import traceback

import torch
import torchvision
from torch import nn

from pycompress.cost import measure_cost
from pycompress.prune import L1, OneShot, Target, prune

# name, constructor kwargs, input size (the smallest that every stage accepts; ViT needs 224)
MODELS = [
    ("alexnet", {}, 64), ("vgg16_bn", {}, 64), ("resnet18", {}, 64), ("resnet50", {}, 64),
    ("wide_resnet50_2", {}, 64), ("resnext50_32x4d", {}, 64), ("densenet121", {}, 64),
    ("googlenet", {"aux_logits": False, "init_weights": True}, 64),
    ("inception_v3", {"aux_logits": False, "init_weights": True}, 96), ("squeezenet1_1", {}, 64),
    ("mobilenet_v2", {}, 64), ("mobilenet_v3_large", {}, 64), ("mnasnet1_0", {}, 64),
    ("efficientnet_b0", {}, 64), ("regnet_y_400mf", {}, 64), ("shufflenet_v2_x1_0", {}, 64),
    ("convnext_tiny", {}, 64), ("vit_b_16", {}, 224), ("swin_t", {}, 64),
]
CHANNELS = 0.3


def _classifier(model: nn.Module) -> nn.Module:
    """The last Linear or Conv2d defined: the layer whose outputs are the classes."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def _pycompress(model, x):
    # the graph outputs' channels are always kept; ignoring the classifier would also lock its inputs
    return prune(model, x, L1(), OneShot(), Target(channels=CHANNELS), inplace=True)


def _torch_pruning(model, x):
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=CHANNELS, ignored_layers=[_classifier(model)])
    pruner.step()
    return model


LIBRARIES = {"pycompress": _pycompress, "torch_pruning": _torch_pruning}


def run_one(name, kwargs, size, library):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    dense = measure_cost(model, x)
    start = time.perf_counter()
    try:
        pruned = LIBRARIES[library](model, x)  # Torch-Pruning traces with autograd: no no_grad here
        with torch.no_grad():
            out = tuple(pruned(x).shape)
    except Exception as e:  # report every failure and go on with the next model
        return {"pruned": False, "input": size, "error": f"{type(e).__name__}: {e}"[:600],
                "where": traceback.format_exc().strip().splitlines()[-3][:300]}
    cost = measure_cost(pruned, x)
    return {"pruned": cost.params < dense.params, "output_shape_kept": out == shape, "input": size,
            "params": [dense.params, cost.params], "macs": [dense.macs, cost.macs],
            "params_ratio": round(cost.params / dense.params, 4), "macs_ratio": round(cost.macs / dense.macs, 4),
            "seconds": round(time.perf_counter() - start, 1)}


def _write(path, report):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def table(report) -> str:
    """The markdown table of a report: per model and library, the ratios or why it did not prune."""
    def cell(r):
        if not r.get("pruned"):
            return "not pruned: " + r.get("error", "no channel removed").split("\n")[0][:90].replace("|", "/")
        shape = "" if r["output_shape_kept"] else ", **output shape changed**"
        return f"{r['params_ratio']:.3f} / {r['macs_ratio']:.3f}{shape}"

    rows = ["| model | input | pycompress params / MACs | Torch-Pruning params / MACs |", "|---|---|---|---|"]
    for name, libs in report["models"].items():
        size = next((r["input"] for r in libs.values() if "input" in r), "")
        rows.append(f"| {name} | {size} | {cell(libs['pycompress'])} | {cell(libs['torch_pruning'])} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/prune/zoo.json")
    parser.add_argument("--models", nargs="*", help="a subset of the model names (updates their rows in --out)")
    parser.add_argument("--libraries", nargs="*", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip their models")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return
    import torch_pruning

    report = {"torch": torch.__version__, "torchvision": torchvision.__version__,
              "torch_pruning": torch_pruning.__version__, "criterion": "l1", "channels_removed": CHANNELS,
              "models": {}}
    if (args.models or args.resume) and os.path.exists(args.out):  # a subset or a resumed run updates rows only
        with open(args.out) as f:
            report["models"] = json.load(f)["models"]
    done = set(report["models"]) if args.resume else set()
    for name, kwargs, size in MODELS:
        if (args.models and name not in args.models) or name in done:
            continue
        report["models"][name] = {lib: run_one(name, kwargs, size, lib) for lib in args.libraries}
        print(name, {lib: r.get("params_ratio", r.get("error", "")[:120]) for lib, r in report["models"][name].items()},
              flush=True)
        _write(args.out, report)


if __name__ == "__main__":
    main()
