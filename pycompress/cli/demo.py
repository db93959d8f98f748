"""``pycompress demo``: knowledge distillation on the embedded digits, and the KD kernel's speed.

1. Trains the teacher CNN (about 1.2 M parameters) with cross-entropy.
2. Trains the small student (about 1.9 k parameters) twice per seed with the
   distillation workflow, the same way: once with cross-entropy only, once with
   :class:`pycompress.KDLoss` (Hinton soft targets plus hard labels).
3. Times the fused KD loss (forward + backward) against the same loss written
   in eager PyTorch, interleaved in this process.

``--seeds`` lists the student seeds (default 0,1,2); ``--output`` writes the JSON report.
"""


def configure(parser):
    parser.add_argument("--epochs", type=int, default=30, help="student epochs (default 30)")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs (default 15)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term (default 0.9)")
    parser.add_argument("--bench-rows", type=int, default=2048, help="rows N of the kernel timing (V = 32000)")


def run(args) -> int:
    import torch

    from pycompress.cli.common import atomic_write_json
    from pycompress.data import digits_splits
    from pycompress.distill import distill
    from pycompress.distill.strategies import Hinton
    from pycompress.distill.workflow import train_teacher
    from pycompress.functional import check_kd_hyperparameters
    from pycompress.models import student_cnn, teacher_cnn

    check_kd_hyperparameters(args.temperature, args.alpha, "forward_kl", 0.5, "batchmean")
    for name in ("epochs", "teacher_epochs", "bench_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    seeds = [args.seed] if args.seed is not None else (args.seeds or [0, 1, 2])
    device, progress = args.device or "cpu", bool(args.progress)
    data = digits_splits()
    print(f"digits: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images (8x8)")

    torch.manual_seed(0)
    teacher = teacher_cnn()
    teacher_report = train_teacher(teacher, data.train, eval_data=data.val, test_data=data.test,
                                   epochs=args.teacher_epochs, device=device, progress=progress)
    print(f"teacher: {teacher_report['parameters']:,} parameters, test accuracy {teacher_report['accuracy']:.4f}")

    # The student with and without KDLoss, trained the same way over several seeds.
    result = distill(student_cnn, teacher.eval(), data.train,
                     strategy={"kd": Hinton(temperature=args.temperature, alpha=args.alpha)},
                     eval_data=data.val, test_data=data.test, seeds=seeds, epochs=args.epochs, device=device,
                     output="", progress=progress, print_table=True)

    speed = _kernel_speed(args.bench_rows, 32000, args.temperature)
    print(f"KD loss kernel, fwd+bwd, N={args.bench_rows} V=32000 fp32, {torch.get_num_threads()} threads: "
          f"pycompress {speed['pycompress_ms']:.1f} ms, eager PyTorch {speed['eager_ms']:.1f} ms "
          f"({speed['eager_ms'] / speed['pycompress_ms']:.1f}x faster)")
    if args.output:
        report = {"teacher": teacher_report, "distillation": result.report, "kernel": speed}
        atomic_write_json(report, args.output, default=str)
    return 0


def _kernel_speed(n, v, temperature):
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from pycompress import kd_loss

    torch.manual_seed(0)
    s = torch.randn(n, v).requires_grad_()
    t = torch.randn(n, v)

    def fused():
        s.grad = None
        kd_loss(s, t, temperature=temperature).backward()

    def eager():
        s.grad = None
        T = temperature
        (T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                          reduction="batchmean")).backward()

    times = {"pycompress": [], "eager": []}
    for _ in range(4):  # interleaved; the first round is warm-up
        for name, fn in (("pycompress", fused), ("eager", eager)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {f"{k}_ms": statistics.median(v[1:]) * 1e3 for k, v in times.items()}
