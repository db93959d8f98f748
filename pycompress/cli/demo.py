"""``pycompress demo``: the whole compression story on the embedded data, in a few minutes on 2 cores.

1. Distillation where it helps: the teacher CNN learns the full digits training set, the
   1.9 k-parameter student only a stratified ``--fraction`` of it, with hard labels and with
   Hinton soft targets (same steps, same seeds); the gain is the paired mean over seeds.
2. Pruning: a VGG-style net, Taylor-pruned to ~10 % of its parameters and fine-tuned, and the
   dense net block-sparsified (90 % of 8x8 blocks) and fine-tuned; latency against the dense net.
3. Detection: the shipped YOLO teacher (``results/detection/yolo_teacher.pt``, found relative to
   the source tree; skipped with a printed reason when absent), a tiny YOLO student trained
   alone and distilled (objectness scaling + FM-NMS) by the workflow of
   ``pycompress distill --strategy mehta_ozturk``, teacher cache included.
4. The fused kernels against eager PyTorch: KD loss, NMS, block-sparse conv.

Prints one summary table, writes the JSON report (``--output``, default ``demo_report.json``)
and a quality-against-latency figure (``--figure``, default ``demo.png``). ``--quick`` runs the
same path at a size that takes seconds (the test suite's).
"""

import os
import statistics
import time
from pathlib import Path

# (full, quick): every size of the demo in one place
SIZES = {
    "teacher_epochs": (8, 1), "student_steps": (300, 20), "seeds": ((0, 1, 2), (0, 1)),
    "vgg_epochs": (10, 1), "prune_steps": (6, 2), "prune_finetune_steps": (30, 5), "finetune_epochs": (6, 1),
    "sparse_finetune_epochs": (3, 1),
    "det_train_images": (1500, 32), "det_test_images": (300, 16), "det_epochs": (2, 1),
    "bench_rows": (2048, 64), "nms_boxes": (2000, 100), "latency_repeats": (30, 3),
}
TEACHER_PATH = Path(__file__).resolve().parents[2] / "results" / "detection" / "yolo_teacher.pt"


def configure(parser):
    parser.add_argument("--quick", action="store_true", help="the same path at a size that runs in seconds")
    parser.add_argument("--fraction", type=float, default=0.1, help="student's share of the training set (0.1)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term (default 0.9)")
    parser.add_argument("--figure", default="demo.png", help="quality-against-latency PNG (default demo.png)")
    parser.add_argument("--detection-teacher", default=str(TEACHER_PATH),
                        help="YOLO teacher state_dict (default: the one shipped in results/detection)")


def run(args) -> int:
    import torch

    from pycompress.cli.common import atomic_write_json
    from pycompress.functional import check_kd_hyperparameters

    check_kd_hyperparameters(args.temperature, args.alpha, "forward_kl", 0.5, "batchmean")
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    size = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    if args.seed is not None:
        size["seeds"] = (args.seed,)
    elif args.seeds:
        size["seeds"] = tuple(args.seeds)
    output = args.output or "demo_report.json"
    start = time.perf_counter()
    rows = []  # one per model: name, group, parameters, macs, metric, quality, latency_ms
    report = {"quick": bool(args.quick), "threads": torch.get_num_threads(), "sizes": size}
    report["distillation"] = _distillation(args, size, rows)
    report["pruning"] = _pruning(size, rows)
    report["detection"] = _detection(args, size, rows)
    report["kernels"] = _kernels(args, size)
    report["models"] = rows
    report["figure"] = _figure(rows, args.figure)
    report["wall_seconds"] = time.perf_counter() - start
    print(_summary_table(rows))
    for line in report["kernels"].values():
        print(line["line"])
    print(f"figure: {os.path.abspath(args.figure)}")
    atomic_write_json(report, output)
    print(f"report: {os.path.abspath(output)} ({report['wall_seconds']:.0f} s)")
    return 0


def _row(rows, name, group, model, example, metric, quality, latency_ms):
    from pycompress.cost import count_macs, count_params

    rows.append({"model": name, "group": group, "parameters": count_params(model),
                 "macs": count_macs(model, example), "metric": metric, "quality": quality,
                 "latency_ms": latency_ms})


def _distillation(args, size, rows):
    import torch

    from pycompress.cost import compare_latency
    from pycompress.data import digits_splits, stratified_subset
    from pycompress.distill import Hinton, distill, train_teacher
    from pycompress.models import student_cnn, teacher_cnn
    from pycompress.train import evaluate_classifier

    data = digits_splits()
    torch.manual_seed(0)
    teacher = teacher_cnn()
    teacher_report = train_teacher(teacher, data.train, epochs=size["teacher_epochs"], progress=False)
    teacher_acc = evaluate_classifier(teacher, data.test)["accuracy"]
    hard, soft = [], []
    for seed in size["seeds"]:  # a new subset per seed; baseline and KD share it
        subset = stratified_subset(data.train, args.fraction, seed)
        result = distill(student_cnn, teacher.eval(), subset, {"kd": Hinton(args.temperature, args.alpha)},
                         seeds=[seed], epochs=1_000_000, max_steps=size["student_steps"], batch_size=64, lr=3e-3,
                         optimizer="adam", output="", progress=False, print_table=False)
        hard.append(evaluate_classifier(result.students["baseline"][0], data.test)["accuracy"])
        soft.append(evaluate_classifier(result.students["kd"][0], data.test)["accuracy"])
        student = result.students["kd"][0]
    gains = [s - h for s, h in zip(soft, hard)]
    x = data.test.tensors[0][:1]
    latency = compare_latency({"teacher": teacher, "student": student}, tuple(x.shape[1:]), (1,),
                              repeats=size["latency_repeats"])
    pct = f"{args.fraction:.0%}"
    _row(rows, "teacher CNN (100% data)", "distillation", teacher, x, "accuracy", teacher_acc,
         latency["teacher"]["batch1_ms"])
    _row(rows, f"student, hard labels ({pct})", "distillation", student, x, "accuracy", statistics.mean(hard),
         latency["student"]["batch1_ms"])
    _row(rows, f"student, Hinton KD ({pct})", "distillation", student, x, "accuracy", statistics.mean(soft),
         latency["student"]["batch1_ms"])
    out = {"fraction": args.fraction, "train_images": len(subset),
           "temperature": args.temperature, "alpha": args.alpha, "student_steps": size["student_steps"],
           "seeds": list(size["seeds"]), "teacher_accuracy": teacher_acc,
           "teacher_parameters": teacher_report["parameters"], "hard_accuracy": hard, "kd_accuracy": soft,
           "gain_per_seed": gains, "gain_mean": statistics.mean(gains),
           "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0}
    print(f"distillation on {pct} of the digits ({len(size['seeds'])} seeds): hard {statistics.mean(hard):.4f}, "
          f"KD {statistics.mean(soft):.4f}, gain {out['gain_mean']:+.4f} ± {out['gain_std']:.4f}")
    return out


def _pruning(size, rows):
    import copy

    import torch

    from pycompress.config import TrainConfig
    from pycompress.cost import compare_latency
    from pycompress.data import digits_splits
    from pycompress.models.nets import VGGStyle
    from pycompress.prune import FineTune, Iterative, Target, Taylor, prune
    from pycompress.sparsity import block_sparsify
    from pycompress.train import Trainer, evaluate_classifier

    data = digits_splits()

    def train(model, epochs):
        cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=32, weight_decay=1e-4, scheduler="cosine")
        Trainer(model, data.train, cfg, seed=0, progress=False).fit()
        return model.eval()

    torch.manual_seed(0)
    dense = train(VGGStyle(), size["vgg_epochs"])
    x = data.test.tensors[0][:1]
    schedule = Iterative(size["prune_steps"], fine_tune=FineTune(steps=size["prune_finetune_steps"]))
    pruned = prune(dense, x, Taylor(), schedule, Target(params=0.1, round_to=8), train_data=data.train)
    train(pruned, size["finetune_epochs"])
    sparse = block_sparsify(copy.deepcopy(dense), sparsity=0.9, exclude="features.0.*", example_input=x,
                            inplace=True).model
    train(sparse, size["sparse_finetune_epochs"])  # the kept blocks learn; pruned blocks stay zero
    latency = compare_latency({"dense": dense, "pruned": pruned, "sparse": sparse}, tuple(x.shape[1:]), (1, 32),
                              repeats=size["latency_repeats"])
    acc = {k: evaluate_classifier(m, data.test)["accuracy"] for k, m in
           (("dense", dense), ("pruned", pruned), ("sparse", sparse))}
    _row(rows, "VGG dense", "pruning", dense, x, "accuracy", acc["dense"], latency["dense"]["batch1_ms"])
    _row(rows, "VGG Taylor-pruned", "pruning", pruned, x, "accuracy", acc["pruned"], latency["pruned"]["batch1_ms"])
    _row(rows, "VGG block-sparse 90%", "pruning", sparse, x, "accuracy", acc["sparse"], latency["sparse"]["batch1_ms"])
    out = {"accuracy": acc, "latency_ms": latency,
           "params_ratio": rows[-3]["parameters"] / rows[-2]["parameters"]}
    print(f"pruning: {out['params_ratio']:.1f}x fewer parameters, accuracy {acc['dense']:.4f} -> {acc['pruned']:.4f}; "
          f"block-sparse {acc['sparse']:.4f}, batch-32 latency {latency['dense']['batch32_ms']:.2f} -> "
          f"{latency['sparse']['batch32_ms']:.2f} ms")
    return out


def _detection(args, size, rows):
    """The workflow of ``pycompress distill --strategy mehta_ozturk`` (teacher cache included), on the demo's sizes."""
    from pycompress.config import DataConfig, DistillConfig, ModelConfig, TeacherConfig, TrainConfig
    from pycompress.cost import compare_latency
    from pycompress.data import digit_detection
    from pycompress.distill.workflow import distill_from_config
    from pycompress.models.detection import build_detector

    if not os.path.exists(args.detection_teacher):
        reason = f"no detection teacher at {args.detection_teacher} (it ships in the source tree's results/detection)"
        print(f"detection: skipped, {reason}")
        return {"skipped": reason}
    # labeled canvases only (unlabeled_ratio 0): at this step budget unlabeled ones did not help
    # (results/detection/distill/README.md)
    num_images = {"train": size["det_train_images"], "val": 8, "test": size["det_test_images"], "unlabeled": 8}
    cfg = DistillConfig(
        seeds=[0], strategies=["mehta_ozturk"], output="", progress=False,
        strategy={"mehta_ozturk": {"fm_nms": True, "objectness_scaling": True}},
        teacher=TeacherConfig(model="yolo_teacher", kwargs={"width": 16}, checkpoints=[args.detection_teacher]),
        student=ModelConfig(model="tiny_yolo"),
        data=DataConfig(dataset="pycompress.data:digit_detection_splits",
                        kwargs={"seed": 0, "num_images": num_images}),
        train=TrainConfig(epochs=size["det_epochs"], batch_size=16, optimizer="adam", lr=3e-3))
    report = distill_from_config(cfg).report
    runs = report["runs"]
    ap = {"teacher": report["teacher"]["test"]["AP50"], "alone": runs["student_alone"]["test"]["AP50"]["mean"],
          "distilled": runs["mehta_ozturk"]["test"]["AP50"]["mean"]}
    # parameters, MACs and latency depend on the architecture only: fresh instances measure them
    teacher = build_detector("yolo_teacher", width=16).eval()
    student = build_detector("tiny_yolo").eval()
    x = digit_detection("test", 1, seed=0).tensors[0]  # one canvas, for MACs and latency
    latency = compare_latency({"teacher": teacher, "student": student}, tuple(x.shape[1:]), (1,),
                              repeats=size["latency_repeats"])
    _row(rows, "YOLO teacher", "detection", teacher, x, "AP50", ap["teacher"], latency["teacher"]["batch1_ms"])
    _row(rows, "tiny YOLO alone", "detection", student, x, "AP50", ap["alone"], latency["student"]["batch1_ms"])
    _row(rows, "tiny YOLO distilled", "detection", student, x, "AP50", ap["distilled"],
         latency["student"]["batch1_ms"])
    print(f"detection AP50 on {size['det_test_images']} test canvases: teacher {ap['teacher']:.3f}, student alone "
          f"{ap['alone']:.3f}, distilled (mehta_ozturk) {ap['distilled']:.3f} ({report['labeled_images']} labeled "
          f"+ {report['unlabeled_images']} unlabeled canvases x {size['det_epochs']} epochs, teacher cached)")
    return {"AP50": ap, "labeled_images": report["labeled_images"], "unlabeled_images": report["unlabeled_images"],
            "epochs": size["det_epochs"], "teacher_cache": report.get("teacher_cache"), "workflow": report}


def _kernels(args, size):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pycompress import kd_loss
    from pycompress.cost import interleaved_medians
    from pycompress.functional import nms
    from pycompress.nn import BlockSparseConv2d

    torch.manual_seed(0)
    n, v, temp = size["bench_rows"], 32000, args.temperature
    s, t = torch.randn(n, v).requires_grad_(), torch.randn(n, v)

    def fused_kd():
        s.grad = None
        kd_loss(s, t, temperature=temp).backward()

    def eager_kd():
        s.grad = None
        (temp * temp * F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                                reduction="batchmean")).backward()

    xy = torch.rand(size["nms_boxes"], 2) * 500
    boxes = torch.cat([xy, xy + 20 + torch.rand(size["nms_boxes"], 2) * 60], 1)
    scores = torch.rand(size["nms_boxes"])

    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    sparse = BlockSparseConv2d.from_dense(conv, sparsity=0.9).eval()
    image = torch.randn(8, 256, 14, 14)

    results = {}
    for name, label, fns in (
            ("kd_loss", f"KD loss fwd+bwd, N={n} V={v}", {"pycompress": fused_kd, "eager": eager_kd}),
            ("nms", f"NMS, {size['nms_boxes']} boxes", {"pycompress": lambda: nms(boxes, scores, 0.5),
                                                         "eager": lambda: _eager_nms(boxes, scores, 0.5)}),
            ("block_sparse_conv", "block-sparse conv 256->256 3x3 at 90%, batch 8 14x14 (eager = dense conv)",
             {"pycompress": lambda: _no_grad(sparse, image), "eager": lambda: _no_grad(conv, image)})):
        ms = {k: 1e3 * sec for k, sec in interleaved_medians(fns, repeats=3, warmup=1).items()}
        ratio = ms["eager"] / ms["pycompress"]
        results[name] = {"pycompress_ms": ms["pycompress"], "eager_ms": ms["eager"], "speedup": ratio,
                         "line": f"{label}: pycompress {ms['pycompress']:.2f} ms, eager PyTorch "
                                 f"{ms['eager']:.2f} ms ({ratio:.1f}x)"}
    return results


def _no_grad(module, x):
    import torch

    with torch.no_grad():
        return module(x)


def _eager_nms(boxes, scores, iou_threshold):
    """Greedy NMS written with PyTorch tensor ops: the textbook loop, one kept box at a time."""
    import torch

    order = scores.argsort(descending=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(int(i))
        rest = boxes[order[1:]]
        lt = torch.maximum(boxes[i, :2], rest[:, :2])
        rb = torch.minimum(boxes[i, 2:], rest[:, 2:])
        inter = (rb - lt).clamp_min(0).prod(1)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        iou = inter / (area(boxes[i]) + area(rest) - inter)
        order = order[1:][iou <= iou_threshold]
    return torch.tensor(keep)


def _summary_table(rows):
    from pycompress.cli.common import format_table

    body = [(r["model"], f"{r['parameters']:,}", f"{r['macs'] / 1e6:.2f} M", f"{r['metric']} {r['quality']:.4f}",
             f"{r['latency_ms']:.3f}") for r in rows]
    return format_table(("model", "parameters", "MACs", "accuracy / AP50", "latency b1 ms"), body, markdown=True)


def _figure(rows, path):
    """Quality against batch-1 latency, one marker per model, one colour per part of the demo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5))
    markers = "osD^v<>"
    for ax, metric in zip(axes, ("accuracy", "AP50")):
        chosen = [r for r in rows if r["metric"] == metric]
        for i, r in enumerate(chosen):
            ax.scatter(r["latency_ms"], r["quality"], s=70, marker=markers[i % len(markers)],
                       label=f"{r['model']} ({r['parameters']:,} params)")
        ax.set_xscale("log")
        # Plain ms labels at 1-2-5 steps: matplotlib's default minor labels (3x10^-1, 4x10^-1) overlap.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU latency at batch 1 (ms, log scale)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title("classifiers (digits)" if metric == "accuracy" else "detectors (digit canvases)")
        ax.grid(True, alpha=0.3)
        if chosen:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: no point hidden
        else:
            ax.text(0.5, 0.5, "skipped (no teacher checkpoint)", ha="center", transform=ax.transAxes)
    fig.suptitle("pycompress demo: quality against latency, every model a point")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)  # atomic, like the report
    return os.path.abspath(path)
