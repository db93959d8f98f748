"""The ``pycompress`` command. Each subcommand lives in its own module, which
provides ``configure(parser)`` (adds its arguments) and ``run(args) -> int``.
Every module is imported to build the parser, so keep heavy imports inside ``run``."""

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("pycompress.demo", "run the KD demo on the embedded digits data"),
    "distill": ("pycompress.distill.cli", "distil a teacher into a student with one or more strategies"),
    "train-teacher": ("pycompress.distill.teacher_cli", "train a teacher for distillation and save its state_dict"),
    "prune": ("pycompress.prune.cli", "structural pruning -> fine-tuning, with a params/FLOPs/latency/accuracy report"),
    "block-sparsify": ("pycompress.prune.block_sparse_cli",
                       "block-sparse layers at several sparsities: latency vs dense, FLOPs and accuracy"),
    "train-detector": ("pycompress.detection.cli", "train a detector (YOLO- or SSD-style) and report COCO mAP"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pycompress", description="Kernel-accelerated model compression: distillation, pruning, sparsity.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
