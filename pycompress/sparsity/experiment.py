"""The block-sparsify experiment: what block sparsity buys in latency, and costs in accuracy.

For each sparsity, a copy of the model has its convs and linears converted to
block-sparse layers (:func:`block_sparsify`), is optionally fine-tuned (only the
kept blocks train), and is measured against the dense model: test accuracy,
FLOPs saved (2 x MACs, :mod:`pycompress.cost`), and CPU latency at each batch
size (interleaved medians). With ``fold_bn`` both sides are BN-folded, so the
comparison is deployment against deployment.
"""

from typing import Optional

import torch
from torch import nn

from pycompress.config import BlockSparsifyConfig, replace, to_dict
from pycompress.cost import compare_latency
from pycompress.sparsity.convert import block_sparsify, fold_batchnorm
from pycompress.train import Trainer, evaluate_classifier, load_file, resolve_device

__all__ = ["block_sparsify_experiment", "block_sparsify_from_config", "format_report"]


def block_sparsify_experiment(model: nn.Module, train_data=None, eval_data=None, test_data=None,
                              config: Optional[BlockSparsifyConfig] = None, **options) -> dict:
    """Runs the experiment on ``model`` (trained in place first when ``config.dense.epochs``).

    Args:
        model (nn.Module): the dense model.
        train_data, eval_data, test_data: the splits; ``None`` for latency alone
            (then ``input_shape`` must be set and no training asked for).
        config (BlockSparsifyConfig, optional): every setting, with the CLI's defaults;
            keyword ``options`` named like its fields replace them.

    Returns:
        dict: ``config``, ``threads``, ``input_shape`` and ``rows``: one per model
        (dense first) with ``sparsity``, ``density`` (FLOPs-weighted kept fraction of
        the converted layers), ``flops_saved`` (fraction), ``accuracy`` (None without
        test data), ``batch{b}_ms`` and, for the sparse ones, ``speedup_batch{b}`` and
        the per-layer report.
    """
    cfg = replace(config or BlockSparsifyConfig(), **options)
    seed = cfg.single_seed()
    if train_data is None and (cfg.dense.epochs or cfg.finetune.epochs):
        raise ValueError("training (dense.epochs, finetune.epochs) needs train_data (--data)")
    device = resolve_device(cfg.device)

    def train(m, recipe, seed):
        Trainer(m, train_data, recipe, eval_data=eval_data, seed=seed, device=device,
                progress=cfg.progress).fit()
        m.cpu()

    if cfg.dense.epochs:
        train(model, cfg.dense, seed)
    model.eval()
    if cfg.input_shape:
        shape = tuple(cfg.input_shape)
    elif train_data is not None:
        shape = tuple(train_data[0][0].shape)
    else:
        raise ValueError("input_shape (--input-shape) is needed without data")
    example = torch.randn(1, *shape)
    accuracy = (lambda m: evaluate_classifier(m, test_data)["accuracy"]) if test_data is not None else (lambda m: None)

    dense = fold_batchnorm(model, inplace=False).model if cfg.fold_bn else model
    models = {"dense": dense}
    rows = [{"model": "dense", "sparsity": 0.0, "density": 1.0, "flops_saved": 0.0, "accuracy": accuracy(dense)}]
    # Fine-tuning keeps its BatchNorms (a folded net trains badly: 90 % sparse on digits
    # fell to chance), which are folded into the sparse layers afterwards.
    fold_first = cfg.fold_bn and not cfg.finetune.epochs
    for sparsity in cfg.sparsities:
        report = block_sparsify(model, sparsity, tuple(cfg.block_size) or None, exclude=cfg.exclude or None,
                                example_input=example, fold_bn=fold_first, inplace=False)
        sparse = report.model
        if cfg.finetune.epochs:
            train(sparse, cfg.finetune, seed + 1)
        sparse.eval()
        if cfg.fold_bn and not fold_first:
            fold_batchnorm(sparse, inplace=True)
        converted = [r for r in report.layers if r.block_size is not None]
        density = (sum(r.density * r.dense_flops for r in converted) / sum(r.dense_flops for r in converted)
                   if converted else 1.0)
        name = f"{sparsity:g} sparse"
        models[name] = sparse
        rows.append({"model": name, "sparsity": sparsity, "density": density,
                     "flops_saved": report.flops_saved / report.dense_flops if report.dense_flops else 0.0,
                     "accuracy": accuracy(sparse),
                     "layers": [{k: v for k, v in vars(r).items()} for r in report.layers]})
    latency = compare_latency(models, shape, cfg.batch_sizes, repeats=cfg.repeats)
    for row in rows:
        for b in cfg.batch_sizes:
            row[f"batch{b}_ms"] = latency[row["model"]][f"batch{b}_ms"]
            if row["model"] != "dense":
                row[f"speedup_batch{b}"] = latency["dense"][f"batch{b}_ms"] / row[f"batch{b}_ms"]
    return {"config": to_dict(cfg), "threads": torch.get_num_threads(), "input_shape": list(shape), "rows": rows}


def block_sparsify_from_config(cfg: BlockSparsifyConfig) -> dict:
    """``pycompress block-sparsify``: builds the model and data ``cfg`` names, runs the experiment, prints
    the table and writes the report (``cfg.output``) atomically."""
    from pycompress.cli.common import atomic_write_json, build_model, load_data

    seed = cfg.single_seed()
    splits = (None, None, None) if cfg.data.dataset == "none" else load_data(cfg.data.dataset, cfg.data.kwargs,
                                                                            seed=seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model.model, cfg.model.kwargs, "model.model")
    if cfg.weights:
        model.load_state_dict(load_file(cfg.weights, "weights file"))
    result = block_sparsify_experiment(model, *splits, config=cfg)
    print(format_report(result))
    if cfg.output:
        atomic_write_json(result, cfg.output)
    return result


def format_report(report: dict) -> str:
    """A plain-text table: one row per model (dense first)."""
    from pycompress.cli.common import format_table

    batch_sizes = report["config"]["batch_sizes"]
    head = ["model", "density", "FLOPs saved", "accuracy"] + [f"b{b} ms" for b in batch_sizes]
    rows = []
    for r in report["rows"]:
        acc = r.get("accuracy")
        rows.append([r["model"], f"{r['density']:.3f}", f"{r['flops_saved']:.1%}",
                     "-" if acc is None else f"{100 * acc:.2f}%"]
                    + [f"{r[f'batch{b}_ms']:.3f}" + ("" if r["model"] == "dense" else
                                                      f" ({r[f'speedup_batch{b}']:.2f}x)") for b in batch_sizes])
    return format_table(head, rows) + f"\n(latency: median of interleaved forwards, {report['threads']} threads)"
