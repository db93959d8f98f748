"""``pycompress block-sparsify``: what block sparsity buys in latency, and costs in accuracy.

Config: :class:`pycompress.config.BlockSparsifyConfig` (file, ``--set``, the flags below);
the experiment is :func:`pycompress.sparsity.block_sparsify_experiment`::

    pycompress block-sparsify --model resnet --dense-epochs 30 --finetune-epochs 10 \\
        --sparsity 0.5,0.75,0.9 --exclude fc --fold-bn

    pycompress block-sparsify --model resnet --model-kwargs '{"width": 64, "in_channels": 3}' \\
        --data none --input-shape 3,56,56 --batch-sizes 1,8 --sparsity 0.9 --fold-bn

``--model`` and ``--data`` take the same values as ``pycompress prune``.
"""

from pycompress.cli.common import add_model_and_training_flags, common_values, model_and_training_values, numbers


def configure(parser):
    add_model_and_training_flags(parser, "resnet", 0, 0, data_help=", or 'none' (latency only)")
    g = parser.add_argument_group("block sparsity")
    g.add_argument("--sparsity", type=numbers(float), help="comma-separated block sparsities (default 0.5,0.75,0.9)")
    g.add_argument("--block-size", type=numbers(int), help="bo,bk (default: per layer, 8,8 on CPU)")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="fnmatch pattern of module names kept dense, e.g. fc for a classifier head "
                        "(a 10-class head is two block rows: pruning it costs the most accuracy)")
    g.add_argument("--fold-bn", action="store_true", default=None, help="fold BatchNorm into the convs (both models)")
    g = parser.add_argument_group("latency")
    g.add_argument("--input-shape", type=numbers(int), help="C,H,W (default: the data's sample shape)")
    g.add_argument("--batch-sizes", type=numbers(int), help="default 1,32")
    g.add_argument("--repeats", type=int, help="timed forwards per model and batch size (default 30)")


def load(args):
    """The :class:`BlockSparsifyConfig` of parsed ``args``: defaults, file, flags, then ``--set``."""
    from pycompress.config import BlockSparsifyConfig, load_config

    values = {**common_values(args), **model_and_training_values(args), "sparsities": args.sparsity,
              "block_size": args.block_size, "exclude": args.exclude, "fold_bn": args.fold_bn,
              "input_shape": args.input_shape, "batch_sizes": args.batch_sizes, "repeats": args.repeats}
    return load_config(BlockSparsifyConfig(), args.config, args.overrides, values)


def run(args) -> int:
    from pycompress.sparsity import block_sparsify_from_config

    block_sparsify_from_config(load(args))
    return 0


def main(argv=None) -> int:
    """Runs the subcommand on its own (``python -m pycompress.cli.block_sparsify``)."""
    from pycompress.cli import run_standalone

    return run_standalone("block-sparsify", argv)


if __name__ == "__main__":
    raise SystemExit(main())
