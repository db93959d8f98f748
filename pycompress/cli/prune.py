"""``pycompress prune``: train (optionally), prune, fine-tune, and report.

Config: :class:`pycompress.config.PruneConfig` (file, ``--set``, the flags below).
On the embedded digits data with a reference model::

    pycompress prune --model vgg --criterion taylor --target-params 0.1 --steps 8 \\
        --fine-tune-steps 30 --dense-epochs 30 --finetune-epochs 20 --output results/prune/vgg_taylor.json

On your own model and data, given as import paths ``package.module:callable``
(the model callable returns an ``nn.Module``; the data callable returns
``(train, val, test)`` indexable datasets of ``(x, y)`` pairs)::

    pycompress prune --model mypkg.nets:build --data mypkg.data:splits --weights trained.pt \\
        --criterion l1 --target-flops 0.5
"""

from pycompress.cli.common import add_model_and_training_flags, common_values, model_and_training_values
from pycompress.config import CRITERIA


def configure(parser):
    add_model_and_training_flags(parser, "vgg", 30, 20)
    g = parser.add_argument_group("pruning")
    g.add_argument("--criterion", choices=CRITERIA, help="default taylor")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-params", type=float, help="keep this fraction of the parameters, e.g. 0.1")
    t.add_argument("--target-flops", type=float, help="keep this fraction of the FLOPs (= of the MACs)")
    t.add_argument("--channel-ratio", type=float, help="remove this fraction of every layer's channels")
    g.add_argument("--steps", type=int, help="iterative pruning steps (default 1 = one-shot)")
    g.add_argument("--units-per-step", type=int, help="instead of --steps: remove this many channels per "
                                                         "iteration until the target (Molchanov)")
    g.add_argument("--per-layer", action="store_true", default=None, help="rank within each layer, not globally")
    g.add_argument("--exclude", "--ignore", action="append", default=None, metavar="MODULE",
                   help="module name never pruned (repeatable)")
    g.add_argument("--round-to", type=int, help="keep a multiple of this many channels per layer")
    g.add_argument("--max-layer-ratio", type=float, help="most a layer may lose (fraction, default 0.9)")
    g.add_argument("--score-batches", type=int, help="minibatches per data-driven scoring (default 8)")
    g.add_argument("--fine-tune-steps", type=int, help="optimizer steps after each pruning step (default 0)")
    g.add_argument("--flops-lambda", type=float, help="taylor's FLOPs regulariser (paper: 1e-3)")
    g.add_argument("--singh-phases", type=int)
    g.add_argument("--singh-l1", type=float)
    g.add_argument("--singh-steps", type=int, help="sparsity-induction steps per phase")
    g.add_argument("--singh-rho", type=float, help="'mostly zero' fraction")
    g.add_argument("--singh-rounds", type=int)
    g.add_argument("--task", choices=("auto", "classification", "detection"),
                   help="loss and quality measure (task): accuracy, or a detector's own loss and AP50; "
                        "default auto (by model)")
    g.add_argument("--save", help="write the pruned, fine-tuned state_dict here (reload with "
                                  "pycompress.prune.load_pruned_state_dict)")


def load(args):
    """The :class:`PruneConfig` of parsed ``args``: defaults, file, flags, then ``--set``."""
    from pycompress.config import PruneConfig, load_config

    values = {**common_values(args), **model_and_training_values(args), "save": args.save, "criterion": args.criterion, "target_params": args.target_params,
              "target_flops": args.target_flops, "channel_ratio": args.channel_ratio, "steps": args.steps,
              "units_per_step": args.units_per_step, "per_layer": args.per_layer, "exclude": args.exclude,
              "round_to": args.round_to, "max_layer_ratio": args.max_layer_ratio,
              "score_batches": args.score_batches, "fine_tune_steps": args.fine_tune_steps,
              "flops_lambda": args.flops_lambda, "singh.phases": args.singh_phases, "singh.l1": args.singh_l1,
              "singh.sparsity_steps": args.singh_steps, "singh.rho": args.singh_rho,
              "singh.rounds": args.singh_rounds, "task": args.task}
    return load_config(PruneConfig(), args.config, args.overrides, values)


def run(args) -> int:
    from pycompress.prune.workflow import prune_experiment

    prune_experiment(load(args))
    return 0


def main(argv=None) -> int:
    """Runs the subcommand on its own (``python -m pycompress.cli.prune``)."""
    from pycompress.cli import run_standalone

    return run_standalone("prune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
