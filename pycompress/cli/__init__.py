"""The ``pycompress`` command: one module per subcommand in this package, shared helpers in :mod:`.common`.

A subcommand module provides ``configure(parser)`` (adds its own flags after
:func:`pycompress.cli.common.add_common_flags`) and ``run(args) -> int``. Every
module is imported to build the parser, so keep heavy imports inside ``run``.
Errors from bad input (``ValueError``, ``TypeError``, ``FileNotFoundError``) are
printed as one line naming the flag, key or file, and exit with status 2;
``--debug`` shows the traceback instead.
"""

import argparse
import importlib
import sys

from pycompress.cli.common import add_common_flags

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("pycompress.cli.demo", "the compression story end to end on the embedded data (distil, prune, sparsify, detect)"),
    "distill": ("pycompress.cli.distill", "distil a teacher into a student with one or more strategies"),
    "train-teacher": ("pycompress.cli.train_teacher", "train a teacher for distillation and save its state_dict"),
    "prune": ("pycompress.cli.prune", "structural pruning -> fine-tuning, with a params/FLOPs/latency/accuracy report"),
    "block-sparsify": ("pycompress.cli.block_sparsify",
                       "block-sparse layers at several sparsities: latency vs dense, FLOPs and accuracy"),
    "train-detector": ("pycompress.cli.train_detector",
                       "train a YOLO- or SSD-style detector on detection data, with a COCO AP / latency report"),
}

BAD_INPUT = (ValueError, TypeError, FileNotFoundError)


def build_parser(prog: str = "pycompress", only: str = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the parser of that one subcommand (``python -m pycompress.cli.prune``)."""
    if only is not None:
        module = importlib.import_module(SUBCOMMANDS[only][0])
        parser = argparse.ArgumentParser(prog=f"{prog} {only}", description=SUBCOMMANDS[only][1])
        add_common_flags(parser)
        module.configure(parser)
        parser.set_defaults(_module=module.__name__, _command=only)
        return parser
    parser = argparse.ArgumentParser(
        prog=prog, description="Kernel-accelerated model compression: distillation, pruning, sparsity.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
        add_common_flags(p)
        importlib.import_module(module).configure(p)
    return parser


def run_parsed(args) -> int:
    """Runs the subcommand ``args`` was parsed for; bad input becomes one line on stderr and status 2."""
    try:
        return importlib.import_module(args._module).run(args)
    except BAD_INPUT as e:
        if args.debug:
            raise
        print(f"pycompress {args._command}: error: {e}", file=sys.stderr)
        return 2


def run_standalone(command: str, argv=None) -> int:
    """One subcommand on its own, e.g. ``python -m pycompress.cli.prune``."""
    return run_parsed(build_parser(only=command).parse_args(argv))


def main(argv=None) -> int:
    return run_parsed(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
