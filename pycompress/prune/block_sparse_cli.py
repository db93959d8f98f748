"""``pycompress block-sparsify``: what block sparsity buys in latency, and costs in accuracy.

For each requested sparsity, a copy of the model has its convs and linears
converted to block-sparse layers (:func:`pycompress.prune.block_sparsify`), is
optionally fine-tuned (only the kept blocks train), and is measured against
the dense model: test accuracy, FLOPs saved, and CPU latency at each batch
size (interleaved medians). With ``--fold-bn`` both sides are BN-folded, so
the comparison is deployment against deployment::

    pycompress block-sparsify --model resnet --dense-epochs 30 --finetune-epochs 10 \\
        --sparsity 0.5,0.75,0.9 --exclude fc --fold-bn

    pycompress block-sparsify --model resnet --model-kwargs '{"width": 64, "in_channels": 3}' \\
        --data none --input-shape 3,56,56 --batch-sizes 1,8 --sparsity 0.9 --fold-bn

``--model`` and ``--data`` take the same values as ``pycompress prune``.
"""

import argparse
import copy
import json
import os

from pycompress.prune.cli import MODELS, load_data, model_factory


def _numbers(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind.__name__}, got {text!r}")
        return values
    return parse


def _model_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def configure(parser: argparse.ArgumentParser):
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="resnet",
                   help=f"one of {', '.join(MODELS)} or an import path 'pkg.mod:factory' (default resnet)")
    g.add_argument("--model-kwargs", type=_model_kwargs, default={}, help="JSON keyword arguments of the factory")
    g.add_argument("--weights", help="trained state_dict to start from")
    g.add_argument("--data", default="digits",
                   help="'digits', 'pkg.mod:fn' returning (train, val, test), or 'none' (latency only)")
    g = parser.add_argument_group("block sparsity")
    g.add_argument("--sparsity", type=_numbers(float), default=[0.5, 0.75, 0.9],
                   help="comma-separated block sparsities (default 0.5,0.75,0.9)")
    g.add_argument("--block-size", type=_numbers(int), help="bo,bk (default: per layer, 8,8 on CPU)")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of module names kept dense, e.g. fc for a classifier head "
                        "(a 10-class head is two block rows: pruning it costs the most accuracy)")
    g.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convs (both models)")
    g = parser.add_argument_group("training")
    g.add_argument("--dense-epochs", type=int, default=0, help="train the dense model first")
    g.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each sparse model")
    g.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    g.add_argument("--finetune-lr", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("latency")
    g.add_argument("--input-shape", type=_numbers(int), help="C,H,W (default: the data's sample shape)")
    g.add_argument("--batch-sizes", type=_numbers(int), default=[1, 32], help="default 1,32")
    g.add_argument("--repeats", type=int, default=30, help="timed forwards per model and batch size")
    g = parser.add_argument_group("output")
    g.add_argument("--out", help="write the JSON report here")
    g.add_argument("--progress", action="store_true", help="show tqdm progress bars")


def _check(args):
    bad = [s for s in args.sparsity if not 0.0 <= s <= 1.0]
    if bad:
        raise SystemExit(f"pycompress block-sparsify: --sparsity values must be in [0, 1], got {bad}")
    if args.block_size is not None and len(args.block_size) != 2:
        raise SystemExit(f"pycompress block-sparsify: --block-size must be bo,bk, got {args.block_size}")
    if args.input_shape is not None and len(args.input_shape) != 3:
        raise SystemExit(f"pycompress block-sparsify: --input-shape must be C,H,W, got {args.input_shape}")
    if args.data == "none" and args.input_shape is None:
        raise SystemExit("pycompress block-sparsify: --data none needs --input-shape")
    if args.data == "none" and (args.dense_epochs or args.finetune_epochs):
        raise SystemExit("pycompress block-sparsify: training needs --data")


def format_report(report: dict) -> str:
    """A plain-text table: one row per model (dense first)."""
    batch_sizes = report["config"]["batch_sizes"]
    head = ["model", "density", "FLOPs saved", "accuracy"] + [f"b{b} ms" for b in batch_sizes]
    rows = [head]
    for r in report["rows"]:
        acc = r.get("accuracy")
        rows.append([r["model"], f"{r['density']:.3f}", f"{r['flops_saved']:.1%}",
                     "-" if acc is None else f"{100 * acc:.2f}%"]
                    + [f"{r[f'batch{b}_ms']:.3f}" + ("" if r["model"] == "dense" else
                                                      f" ({r[f'speedup_batch{b}']:.2f}x)") for b in batch_sizes])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n(latency: median of interleaved forwards, {report['threads']} threads)"


def run(args) -> int:
    _check(args)
    import torch

    from pycompress.prune.block_sparse import block_sparsify, fold_batchnorm
    from pycompress.prune.workflow import compare_latency, train_cosine
    from pycompress.train import evaluate_classifier

    train, val, test = (None, None, None) if args.data == "none" else load_data(args.data, args.seed)
    torch.manual_seed(args.seed)
    model = model_factory(args.model)(**args.model_kwargs)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    if args.dense_epochs:
        train_cosine(model, train, val, epochs=args.dense_epochs, lr=args.lr, batch_size=args.batch_size,
                     seed=args.seed, progress=args.progress)
    model.eval()
    shape = tuple(args.input_shape) if args.input_shape else tuple(train[0][0].shape)
    example = torch.randn(1, *shape)
    accuracy = (lambda m: evaluate_classifier(m, test)["accuracy"]) if test is not None else (lambda m: None)

    dense = copy.deepcopy(model)
    if args.fold_bn:
        fold_batchnorm(dense)
    models = {"dense": dense}
    rows = [{"model": "dense", "sparsity": 0.0, "density": 1.0, "flops_saved": 0.0, "accuracy": accuracy(dense)}]
    # Fine-tuning keeps its BatchNorms (a folded net trains badly: 90 % sparse on digits
    # fell to chance), which are folded into the sparse layers afterwards.
    fold_first = args.fold_bn and not args.finetune_epochs
    for sparsity in args.sparsity:
        sparse = copy.deepcopy(model)
        report = block_sparsify(sparse, sparsity, args.block_size, exclude=args.exclude or None,
                                example_input=example, fold_bn=fold_first)
        if args.finetune_epochs:
            train_cosine(sparse, train, val, epochs=args.finetune_epochs, lr=args.finetune_lr,
                         batch_size=args.batch_size, seed=args.seed + 1, progress=args.progress)
        sparse.eval()
        if args.fold_bn and not fold_first:
            fold_batchnorm(sparse)
        converted = [r for r in report.layers if r.block_size is not None]
        density = (sum(r.density * r.dense_flops for r in converted) / sum(r.dense_flops for r in converted)
                   if converted else 1.0)
        name = f"{sparsity:g} sparse"
        models[name] = sparse
        rows.append({"model": name, "sparsity": sparsity, "density": density,
                     "flops_saved": report.flops_saved / report.dense_flops if report.dense_flops else 0.0,
                     "accuracy": accuracy(sparse), "layers": [vars(r) for r in report.layers]})
    latency = compare_latency(models, shape, args.batch_sizes, repeats=args.repeats)
    for row in rows:
        for b in args.batch_sizes:
            row[f"batch{b}_ms"] = latency[row["model"]][f"batch{b}_ms"]
            if row["model"] != "dense":
                row[f"speedup_batch{b}"] = latency["dense"][f"batch{b}_ms"] / row[f"batch{b}_ms"]
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    result = {"config": config, "threads": torch.get_num_threads(), "input_shape": list(shape), "rows": rows}
    print(format_report(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def main(argv=None) -> int:
    """Runs the subcommand on its own (``python -m pycompress.prune.block_sparse_cli``)."""
    parser = argparse.ArgumentParser(prog="pycompress block-sparsify")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
