"""``pycompress block-sparsify``: what block sparsity buys in latency, and costs in accuracy.

Config: :class:`pycompress.config.BlockSparsifyConfig` (file, ``--set``, the flags below);
the experiment is :func:`pycompress.sparsity.block_sparsify_experiment`::

    pycompress block-sparsify --model resnet --dense-epochs 30 --finetune-epochs 10 \\
        --sparsity 0.5,0.75,0.9 --exclude fc --fold-bn

    pycompress block-sparsify --model resnet --model-kwargs '{"width": 64, "in_channels": 3}' \\
        --data none --input-shape 3,56,56 --batch-sizes 1,8 --sparsity 0.9 --fold-bn

``--model`` and ``--data`` take the same values as ``pycompress prune``.
"""

from pycompress.cli.common import MODELS, json_object, numbers


def configure(parser):
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help=f"one of {', '.join(MODELS)} or an import path 'pkg.mod:factory' "
                                   "(default resnet)")
    g.add_argument("--model-kwargs", type=json_object, help="JSON keyword arguments of the factory")
    g.add_argument("--weights", help="trained state_dict to start from")
    g.add_argument("--data", help="'digits' (default), 'pkg.mod:fn' returning (train, val, test), or 'none' "
                                  "(latency only)")
    g = parser.add_argument_group("block sparsity")
    g.add_argument("--sparsity", type=numbers(float), help="comma-separated block sparsities (default 0.5,0.75,0.9)")
    g.add_argument("--block-size", type=numbers(int), help="bo,bk (default: per layer, 8,8 on CPU)")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="fnmatch pattern of module names kept dense, e.g. fc for a classifier head "
                        "(a 10-class head is two block rows: pruning it costs the most accuracy)")
    g.add_argument("--fold-bn", action="store_true", default=None, help="fold BatchNorm into the convs (both models)")
    g = parser.add_argument_group("training")
    g.add_argument("--dense-epochs", type=int, help="train the dense model first (default 0)")
    g.add_argument("--finetune-epochs", type=int, help="fine-tune each sparse model (default 0)")
    g.add_argument("--lr", type=float, help="dense training learning rate (default 0.05)")
    g.add_argument("--finetune-lr", type=float, help="default 0.01")
    g.add_argument("--batch-size", type=int, help="default 32")
    g = parser.add_argument_group("latency")
    g.add_argument("--input-shape", type=numbers(int), help="C,H,W (default: the data's sample shape)")
    g.add_argument("--batch-sizes", type=numbers(int), help="default 1,32")
    g.add_argument("--repeats", type=int, help="timed forwards per model and batch size (default 30)")


def load(args):
    """The :class:`BlockSparsifyConfig` of parsed ``args``: defaults, file, flags, then ``--set``."""
    from pycompress.cli.common import common_values
    from pycompress.config import BlockSparsifyConfig, load_config

    values = {**common_values(args), "model.model": args.model, "model.kwargs": args.model_kwargs,
              "weights": args.weights, "data.dataset": args.data, "sparsities": args.sparsity,
              "block_size": args.block_size, "exclude": args.exclude, "fold_bn": args.fold_bn,
              "dense.epochs": args.dense_epochs, "dense.lr": args.lr, "finetune.epochs": args.finetune_epochs,
              "finetune.lr": args.finetune_lr, "dense.batch_size": args.batch_size,
              "finetune.batch_size": args.batch_size, "input_shape": args.input_shape,
              "batch_sizes": args.batch_sizes, "repeats": args.repeats}
    return load_config(BlockSparsifyConfig(), args.config, args.overrides, values)


def run(args) -> int:
    from pycompress.sparsity import block_sparsify_from_config

    block_sparsify_from_config(load(args))
    return 0


def main(argv=None) -> int:
    """Runs the subcommand on its own (``python -m pycompress.cli.block_sparsify``)."""
    from pycompress.cli import build_parser, run_parsed

    return run_parsed(build_parser(only="block-sparsify").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
