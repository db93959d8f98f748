"""``pycompress demo``: knowledge distillation on the embedded digits, and the KD kernel's speed.

1. Trains the teacher CNN (about 1.2 M parameters) with cross-entropy.
2. Trains the small student (about 1.9 k parameters) twice per seed, the same
   way: once with cross-entropy only, once with :class:`pycompress.KDLoss`
   (Hinton soft targets plus hard labels).
3. Times the fused KD loss (forward + backward) against the same loss written
   in eager PyTorch, interleaved in this process.
"""

import json
import statistics


def configure(parser):
    parser.add_argument("--epochs", type=int, default=30, help="student epochs (default 30)")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs (default 15)")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds to average over (default 3)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term (default 0.9)")
    parser.add_argument("--bench-rows", type=int, default=2048, help="rows N of the kernel timing (V = 32000)")
    parser.add_argument("--report", help="also write the results as JSON to this path")


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _adam(lr):
    import torch

    return lambda params: torch.optim.Adam(params, lr=lr)


def run(args) -> int:
    import torch

    from pycompress import KDLoss
    from pycompress.data import digits_splits
    from pycompress.functional import check_kd_hyperparameters
    from pycompress.models import student_cnn, teacher_cnn
    from pycompress.train import Trainer, evaluate_classifier

    check_kd_hyperparameters(args.temperature, args.alpha, "forward_kl", 0.5, "batchmean")
    for name in ("epochs", "teacher_epochs", "seeds", "bench_rows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    data = digits_splits()
    print(f"digits: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images (8x8)")

    torch.manual_seed(0)
    teacher = teacher_cnn()
    Trainer(teacher, data.train, eval_data=data.val, epochs=args.teacher_epochs, batch_size=64,
            optimizer=_adam(1e-3), seed=0, progress=False).fit()
    teacher.eval()
    teacher_acc = evaluate_classifier(teacher, data.test)["accuracy"]
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: {n_teacher:,} parameters, test accuracy {teacher_acc:.4f}")

    kd = KDLoss(temperature=args.temperature, alpha=args.alpha)

    def kd_step(model, batch):
        x, y = batch
        with torch.no_grad():
            t = teacher(x)
        return kd(model(x), t, y)

    results = {"baseline": [], "kd": []}
    for seed in range(args.seeds):
        for mode, step_fn in (("baseline", None), ("kd", kd_step)):
            torch.manual_seed(seed)
            student = student_cnn()
            Trainer(student, data.train, step_fn=step_fn, epochs=args.epochs, batch_size=64,
                    optimizer=_adam(3e-3), seed=seed, progress=False).fit()
            student.eval()
            results[mode].append(evaluate_classifier(student, data.test)["accuracy"])
    n_student = sum(p.numel() for p in student.parameters())
    base, with_kd = _mean_std(results["baseline"]), _mean_std(results["kd"])
    print(f"student: {n_student:,} parameters ({n_teacher / n_student:.0f}x fewer), {args.seeds} seeds")
    print(f"  without KD: test accuracy {base[0]:.4f} +- {base[1]:.4f}")
    print(f"  with KDLoss(T={args.temperature}, alpha={args.alpha}): test accuracy {with_kd[0]:.4f} +- "
          f"{with_kd[1]:.4f}")

    speed = _kernel_speed(args.bench_rows, 32000, args.temperature)
    print(f"KD loss kernel, fwd+bwd, N={args.bench_rows} V=32000 fp32, {torch.get_num_threads()} threads: "
          f"pycompress {speed['pycompress_ms']:.1f} ms, eager PyTorch {speed['eager_ms']:.1f} ms "
          f"({speed['eager_ms'] / speed['pycompress_ms']:.1f}x faster)")
    if args.report:
        report = {"teacher": {"parameters": n_teacher, "test_accuracy": teacher_acc},
                  "student": {"parameters": n_student, "without_kd": results["baseline"], "with_kd": results["kd"]},
                  "kernel": speed}
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _kernel_speed(n, v, temperature):
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
