"""``pycompress prune``: train (optionally), prune, fine-tune, and report.

On the embedded digits data with a reference model::

    pycompress prune --model vgg --criterion taylor --target-params 0.1 --steps 8 \\
        --fine-tune-steps 30 --dense-epochs 30 --finetune-epochs 20 --out results/prune/vgg_taylor.json

On your own model and data, given as import paths ``package.module:callable``:
the model callable returns an ``nn.Module``; the data callable returns
``(train, val, test)`` indexable datasets of ``(x, y)`` pairs::

    pycompress prune --model mypkg.nets:build --data mypkg.data:splits --weights trained.pt \\
        --criterion l1 --target-flops 0.5
"""

import argparse
import importlib
import os

# kept literal so that building the parser imports no torch (pycompress.cli imports every subcommand)
CRITERIA = ["taylor", "taylor_weight", "l1", "l2", "bn_scale", "singh", "random"]
MODELS = {"vgg": "VGGStyle", "resnet": "ResNetStyle", "mobilenet": "MobileNetStyle", "concat": "ConcatNet"}


def _import(path: str):
    if ":" not in path:
        raise ValueError(f"expected an import path 'package.module:callable', got {path!r}")
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def model_factory(name: str):
    """The factory of one of :data:`MODELS` or of an import path ``pkg.mod:callable``."""
    if name in MODELS:
        import pycompress.models as models
        return getattr(models, MODELS[name])
    return _import(name)


def load_data(name: str, seed: int):
    """(train, val, test) of ``'digits'`` or of an import path returning them."""
    if name == "digits":
        from pycompress.data import digits_splits
        return digits_splits(seed=seed)
    return _import(name)()


def configure(parser: argparse.ArgumentParser):
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="vgg",
                   help=f"one of {', '.join(MODELS)} or an import path 'pkg.mod:factory' (default vgg)")
    g.add_argument("--data", default="digits", help="'digits' or 'pkg.mod:fn' returning (train, val, test)")
    g.add_argument("--weights", help="trained state_dict to start from (with --dense-epochs 0 to skip training)")
    g = parser.add_argument_group("pruning")
    g.add_argument("--criterion", default="taylor", choices=CRITERIA)
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-params", type=float, help="keep this fraction of the parameters, e.g. 0.1")
    t.add_argument("--target-flops", type=float, help="keep this fraction of the FLOPs (MACs)")
    t.add_argument("--channel-ratio", type=float, help="remove this fraction of every layer's channels")
    g.add_argument("--steps", type=int, default=1, help="iterative pruning steps (1 = one-shot)")
    g.add_argument("--units-per-step", type=int, help="instead of --steps: remove this many channels per "
                                                         "iteration until the target (Molchanov)")
    g.add_argument("--per-layer", action="store_true", help="rank within each layer instead of globally")
    g.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="module name never pruned")
    g.add_argument("--round-to", type=int, default=1, help="keep a multiple of this many channels per layer")
    g.add_argument("--max-layer-ratio", type=float, default=0.9, help="most a layer may lose (fraction)")
    g.add_argument("--score-batches", type=int, default=8, help="minibatches per data-driven scoring")
    g.add_argument("--fine-tune-steps", type=int, default=0, help="optimizer steps after each pruning step")
    g.add_argument("--flops-lambda", type=float, default=0.0, help="taylor's FLOPs regulariser (paper: 1e-3)")
    g.add_argument("--singh-phases", type=int, default=3)
    g.add_argument("--singh-l1", type=float, default=1e-4)
    g.add_argument("--singh-steps", type=int, default=100, help="sparsity-induction steps per phase")
    g.add_argument("--singh-rho", type=float, default=0.9, help="'mostly zero' fraction")
    g.add_argument("--singh-rounds", type=int, default=3)
    g = parser.add_argument_group("training")
    g.add_argument("--dense-epochs", type=int, default=30, help="train the dense model first (0: use --weights)")
    g.add_argument("--finetune-epochs", type=int, default=20)
    g.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    g.add_argument("--finetune-lr", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("output")
    g.add_argument("--out", help="write the JSON report here")
    g.add_argument("--save", help="write the pruned, fine-tuned state_dict here (reload with "
                                  "pycompress.prune.load_pruned_state_dict)")
    g.add_argument("--checkpoint-dir", help="checkpoint every phase here")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    g.add_argument("--progress", action="store_true", help="show tqdm progress bars")


def run(args) -> int:
    import torch

    from pycompress.prune.criteria import Taylor
    from pycompress.prune.workflow import format_report, report_json, run_experiment
    from pycompress.train import atomic_save

    if args.target_params is None and args.target_flops is None and args.channel_ratio is None:
        raise SystemExit("pycompress prune: give one of --target-params, --target-flops, --channel-ratio")
    if args.resume and not args.checkpoint_dir:
        raise SystemExit("pycompress prune: --resume needs --checkpoint-dir")
    train, val, test = load_data(args.data, args.seed)
    factory = model_factory(args.model)
    torch.manual_seed(args.seed)
    model = factory()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    example = train[0][0].unsqueeze(0)
    criterion = Taylor(flops_lambda=args.flops_lambda) if args.criterion == "taylor" else args.criterion
    singh = dict(phases=args.singh_phases, l1=args.singh_l1, sparsity_steps=args.singh_steps, rho=args.singh_rho,
                 rounds=args.singh_rounds)
    report = run_experiment(
        model, example, train, val, test, dense_epochs=args.dense_epochs, finetune_epochs=args.finetune_epochs,
        dense_lr=args.lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size, seed=args.seed,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=args.progress,
        model_factory=lambda: (torch.manual_seed(args.seed), factory())[1],
        criterion=criterion, target_params=args.target_params, target_flops=args.target_flops,
        channel_ratio=args.channel_ratio, steps=args.steps, units_per_step=args.units_per_step,
        per_layer=args.per_layer, ignored_layers=args.ignore,
        round_to=args.round_to, max_layer_ratio=args.max_layer_ratio, score_batches=args.score_batches,
        fine_tune_steps=args.fine_tune_steps, lr=args.finetune_lr,
        **({"singh": singh} if args.criterion == "singh" else {}))
    report["config"].update(model=args.model, data=args.data, criterion=args.criterion)
    print(format_report(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report_json(report) + "\n")
    if args.save:
        atomic_save(report["model"].state_dict(), args.save)
    return 0


def main(argv=None) -> int:
    """Runs the subcommand on its own (``python -m pycompress.prune.cli``)."""
    parser = argparse.ArgumentParser(prog="pycompress prune")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
