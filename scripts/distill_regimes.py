"""The distillation claims in the regimes the papers measured them (issue 15), on the embedded digits.

Writes one JSON per experiment under ``--out`` (results/distill/regimes/):

1. ``hinton_fractions.json``: Hinton soft targets as a regulariser. The teacher is
   trained on the full training set; the student on a stratified 3/10/30/100 %
   subset (a new subset per seed), hard labels against soft targets. T and alpha
   are chosen per fraction on the validation set; test accuracy is reported for
   the chosen pair only (and the whole grid, for transparency).
2. ``omitted_class.json``: the student's transfer set has no example of digit d
   (d = 0..9). Test accuracy on d with the student's logits as trained, and after
   adding a bias b to logit d, b chosen on the validation set (overall accuracy).
3. ``munge_data_limited.json``: teacher ensemble (3 teachers) and student trained on
   the same 10 % labelled subset; MUNGE transfer sets of growing size, labelled by
   the ensemble; every student run makes the same number of optimizer steps, so the
   no-distillation student at that step count is the step-matched control.
4. ``shallow_mimic.json``: Ba & Caruana's logit regression and Sau's noisy teacher
   with a shallow, wide student (one hidden layer of 1024, ~77 k parameters, enough
   capacity to mimic), against the hard-label student and Hinton, same steps.

Every run: Adam lr 3e-3, batch 64, ``--steps`` optimizer steps whatever the set size
(so smaller sets are not trained less), seeds = initialisation + data order (+ subset).
Paired differences are per seed against the no-distillation student of that seed.

    python scripts/distill_regimes.py --seeds 0,1,2,3,4
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pycompress.cli.common import atomic_write_json
from pycompress.data import digits_splits, stratified_subset
from pycompress.distill import Hinton, LogitRegression, Munge, NoisyTeacher, distill, train_teacher
from pycompress.distill.workflow import load_state_dict
from pycompress.models import student_cnn, teacher_cnn
from pycompress.train import evaluate_classifier


def shallow_student(num_classes: int = 10) -> nn.Module:
    """Ba & Caruana's shallow mimic: one wide hidden layer on the 8x8 pixels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, num_classes))


class ProbabilityEnsemble(nn.Module):
    """log of the teachers' mean softmax: logits of the averaged distribution."""

    def __init__(self, teachers):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x):
        probs = torch.stack([t(x).softmax(-1) for t in self.teachers]).mean(0)
        return probs.clamp_min(1e-12).log()


def summary(values):
    return {"values": list(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired(a, b):
    diffs = [x - y for x, y in zip(a, b)]
    return {**summary(diffs), "better": sum(d > 0 for d in diffs), "tied": sum(d == 0 for d in diffs)}


def student_runs(student, teacher, train, strategies, seed, common):
    """{label: trained student} for the baseline and every strategy, one seed."""
    result = distill(student, teacher, train, strategy=strategies, seeds=[seed], print_table=False, **common)
    return {label: models[0] for label, models in result.students.items()}


def accuracy(model, data):
    return evaluate_classifier(model, data)["accuracy"]


def get_teacher(path, train, val, seed, epochs):
    torch.manual_seed(seed)
    model = teacher_cnn()
    if not os.path.exists(path):
        train_teacher(model, train, eval_data=val, seed=seed, epochs=epochs, lr=1e-3, output=path, progress=False)
    return load_state_dict(model, path).eval()


def hinton_fractions(args, data, teacher, common):
    grid = {f"T={t},a={a}": Hinton(temperature=t, alpha=a) for t in args.temperatures for a in args.alphas}
    out = {"grid": list(grid), "fractions": {}}
    for fraction in args.fractions:
        val_acc = {k: [] for k in ["baseline", *grid]}
        test_acc = {k: [] for k in ["baseline", *grid]}
        n_train = []
        for seed in args.seeds:
            subset = stratified_subset(data.train, fraction, seed) if fraction < 1 else data.train
            n_train.append(len(subset))
            for label, model in student_runs(student_cnn, teacher, subset, grid, seed, common).items():
                val_acc[label].append(accuracy(model, data.val))
                test_acc[label].append(accuracy(model, data.test))
        chosen = max(grid, key=lambda k: statistics.mean(val_acc[k]))
        out["fractions"][str(fraction)] = {
            "train_images": n_train, "chosen_on_val": chosen,
            "val": {k: summary(v) for k, v in val_acc.items()},
            "test": {k: summary(v) for k, v in test_acc.items()},
            "hard": summary(test_acc["baseline"]), "soft": summary(test_acc[chosen]),
            "soft_minus_hard": paired(test_acc[chosen], test_acc["baseline"])}
        print(f"fraction {fraction}: hard {out['fractions'][str(fraction)]['hard']['mean']:.4f} "
              f"soft ({chosen}) {out['fractions'][str(fraction)]['soft']['mean']:.4f}", flush=True)
        atomic_write_json(out, os.path.join(args.out, "hinton_fractions.json"))


@torch.no_grad()
def logits_of(model, data):
    model.eval()
    return model(data.tensors[0]), data.tensors[1]


def best_bias(logits, y, digit):
    """The bias added to logit ``digit`` that maximises overall accuracy (ties: the smallest |b|)."""
    candidates = sorted(np.arange(0.0, 15.01, 0.25), key=abs)
    shift = torch.zeros(logits.shape[1])

    def acc(b):
        shift[digit] = b
        return float(((logits + shift).argmax(1) == y).float().mean())

    return max(candidates, key=acc)


def load_json(path, default):
    """The results written so far (runs are resumed per seed), else ``default``."""
    return json.load(open(path)) if os.path.exists(path) else default


def omitted_class(args, data, teacher, common):
    strategy = {"hinton": Hinton(temperature=args.omit_temperature, alpha=args.omit_alpha)}
    path = os.path.join(args.out, "omitted_class.json")
    out = load_json(path, {"temperature": args.omit_temperature, "alpha": args.omit_alpha, "digits": {}})
    x, y = data.train.tensors
    for digit in args.digits:
        transfer = TensorDataset(x[y != digit], y[y != digit])
        runs = out["digits"].setdefault(str(digit), {"runs": {}})["runs"]
        for seed in args.seeds:
            if str(seed) in runs:
                continue
            only_kd = {**common, "baseline": False}
            model = student_runs(student_cnn, teacher, transfer, strategy, seed, only_kd)["hinton"]
            val_logits, val_y = logits_of(model, data.val)
            test_logits, test_y = logits_of(model, data.test)
            b = best_bias(val_logits, val_y, digit)
            shifted = test_logits.clone()
            shifted[:, digit] += b
            on = test_y == digit
            runs[str(seed)] = {
                "bias": b,
                "soft_on_digit": float((test_logits[on].argmax(1) == digit).float().mean()),
                "soft_adjusted_on_digit": float((shifted[on].argmax(1) == digit).float().mean()),
                "soft_overall": float((test_logits.argmax(1) == test_y).float().mean()),
                "soft_adjusted_overall": float((shifted.argmax(1) == test_y).float().mean())}
            atomic_write_json(out, path)
            r = runs[str(seed)]
            print(f"omitted {digit} seed {seed}: on digit {r['soft_on_digit']:.3f} -> adjusted "
                  f"{r['soft_adjusted_on_digit']:.3f} (bias {b:.2f})", flush=True)


def omitted_class_summary(digit_record):
    """{measure: summary over the seeds run} of one omitted digit."""
    runs = list(digit_record["runs"].values())
    return {k: summary([r[k] for r in runs]) for k in runs[0]}


def small_set_teachers(args, labelled, seed):
    """The ensemble's members: ``teacher_cnn`` trained on the labelled subset alone, a fixed step count."""
    teachers = []
    for k in range(args.ensemble_size):
        path = os.path.join(args.work_dir, f"small_teacher_f{args.munge_fraction}_steps{args.teacher_steps}"
                                           f"_s{seed}_{k}.pt")
        member_seed = 100 * seed + k
        torch.manual_seed(member_seed)
        model = teacher_cnn()
        if not os.path.exists(path):
            train_teacher(model, labelled, seed=member_seed, epochs=1_000_000, max_steps=args.teacher_steps,
                          lr=1e-3, output=path, progress=False)
        teachers.append(load_state_dict(model, path).eval())
    return teachers


def munge_data_limited(args, data, common):
    """Teachers and student see the same labelled subset; MUNGE grows the transfer set; equal student steps."""
    path = os.path.join(args.out, "munge_data_limited.json")
    out = load_json(path, {})
    if out.get("teacher_steps") != args.teacher_steps:  # a run of another design (e.g. the epoch-trained teachers)
        out = {"fraction": args.munge_fraction, "factors": args.factors, "teacher_steps": args.teacher_steps,
               "ensemble_size": args.ensemble_size, "student_steps": args.steps, "seeds": {}}
    for seed in args.seeds:
        if str(seed) in out["seeds"]:
            continue
        labelled = stratified_subset(data.train, args.munge_fraction, seed)
        teachers = small_set_teachers(args, labelled, seed)
        ensemble = ProbabilityEnsemble(teachers).eval()
        rec = {"labelled_images": len(labelled),
               "teacher_members_test": [accuracy(t, data.test) for t in teachers],
               "teacher_members_train": [accuracy(t, labelled) for t in teachers],
               "val": {"teacher_ensemble": accuracy(ensemble, data.val)},
               "test": {"teacher_ensemble": accuracy(ensemble, data.test)}}
        runs = {f"munge x{f}": Munge(transfer_factor=float(f), generator="auto") for f in args.factors}
        for label, model in student_runs(student_cnn, ensemble, labelled, runs, seed, common).items():
            rec["val"][label] = accuracy(model, data.val)
            rec["test"][label] = accuracy(model, data.test)
        out["seeds"][str(seed)] = rec
        out.update(munge_summary(out))
        atomic_write_json(out, path)
        print(f"munge seed {seed}: members {rec['teacher_members_test']}, " +
              ", ".join(f"{k} {v:.3f}" for k, v in rec["test"].items()), flush=True)


def munge_summary(out):
    """Test summaries over the seeds run, paired differences against the same-seed student and the teacher."""
    recs = list(out["seeds"].values())
    test = {k: [r["test"][k] for r in recs] for k in recs[0]["test"]}
    munge = [k for k in test if k.startswith("munge")]
    return {"labelled_images": recs[0]["labelled_images"],
            "test": {k: summary(v) for k, v in test.items()},
            "paired_vs_baseline": {k: paired(test[k], test["baseline"]) for k in munge},
            "gap_to_teacher": {k: summary([t - s for t, s in zip(test["teacher_ensemble"], test[k])])
                               for k in ["baseline", *munge]}}


def shallow_mimic(args, data, teacher, common):
    runs = {"hinton": Hinton(temperature=4.0, alpha=0.5), "logits": LogitRegression(),
            **{f"noisy_teacher(sigma={s})": NoisyTeacher(sigma=s) for s in (0.1, 0.3)}}
    val, test = {k: [] for k in ["baseline", *runs]}, {k: [] for k in ["baseline", *runs]}
    n_params = sum(p.numel() for p in shallow_student().parameters())
    for seed in args.seeds:
        for label, model in student_runs(shallow_student, teacher, data.train, runs, seed, common).items():
            val[label].append(accuracy(model, data.val))
            test[label].append(accuracy(model, data.test))
        noisy = [k for k in runs if k.startswith("noisy")]
        chosen = max(noisy, key=lambda k: statistics.mean(val[k]))
        out = {"student_parameters": n_params, "noisy_sigma_chosen_on_val": chosen,
               "val": {k: summary(v) for k, v in val.items()}, "test": {k: summary(v) for k, v in test.items()},
               "paired_vs_baseline": {k: paired(v, test["baseline"]) for k, v in test.items() if k != "baseline"}}
        atomic_write_json(out, os.path.join(args.out, "shallow_mimic.json"))
        print(f"shallow seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in test.items()), flush=True)


def summary_rows(out_dir):
    """Markdown rows "experiment | setting | result" from whatever JSON files exist in ``out_dir``."""
    def load(name):
        path = os.path.join(out_dir, name)
        return json.load(open(path)) if os.path.exists(path) else None

    def ms(s):
        return f"{s['mean']:.4f} ± {s['std']:.4f}"

    rows = []
    if (h := load("hinton_fractions.json")):
        for f, r in h["fractions"].items():
            d = r["soft_minus_hard"]
            rows.append(f"| Hinton soft targets, {float(f):.0%} of the data ({r['train_images'][0]} images, "
                        f"{len(d['values'])} seeds) | hard {ms(r['hard'])}, soft ({r['chosen_on_val']}) "
                        f"{ms(r['soft'])}, paired {ms(d)}, {d['better']} seeds better |")
    if (o := load("omitted_class.json")):
        for digit, record in sorted(o["digits"].items()):
            r = omitted_class_summary(record)
            rows.append(f"| omitted digit {digit} ({len(r['bias']['values'])} seeds) | on the digit: "
                        f"{ms(r['soft_on_digit'])} -> {ms(r['soft_adjusted_on_digit'])} after bias "
                        f"{r['bias']['mean']:.2f}; overall {ms(r['soft_overall'])} -> "
                        f"{ms(r['soft_adjusted_overall'])} |")
    if (m := load("munge_data_limited.json")):
        t = m["test"]
        rows.append(f"| MUNGE data-limited ({m['labelled_images']} labelled, {len(t['baseline']['values'])} seeds) "
                    f"| ensemble {ms(t['teacher_ensemble'])}, no distillation {ms(t['baseline'])}, " +
                    ", ".join(f"{k} {ms(t[k])} (paired {ms(v)}, {v['better']} seeds better; teacher gap "
                              f"{ms(m['gap_to_teacher'][k])})" for k, v in m["paired_vs_baseline"].items()) + " |")
    if (s := load("shallow_mimic.json")):
        t = s["test"]
        rows.append(f"| shallow mimic ({s['student_parameters']:,} params, {len(t['baseline']['values'])} seeds) "
                    f"| no distillation {ms(t['baseline'])}, " +
                    ", ".join(f"{k} {ms(t[k])} (paired {ms(v)})" for k, v in s["paired_vs_baseline"].items()) + " |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every student run")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--fractions", default="0.03,0.1,0.3,1.0")
    p.add_argument("--temperatures", default="2,8", help="Hinton T grid (chosen on val)")
    p.add_argument("--alphas", default="0.5,0.9", help="Hinton alpha grid (chosen on val)")
    p.add_argument("--omit-temperature", type=float, default=4.0)
    p.add_argument("--omit-alpha", type=float, default=0.9)
    p.add_argument("--munge-fraction", type=float, default=0.1)
    p.add_argument("--factors", default="0,1,4,16", help="MUNGE transfer set sizes, x the labelled set")
    p.add_argument("--teacher-steps", type=int, default=200,
                   help="optimizer steps of each small-set teacher (200 of 64 images = ~108 epochs of 119)")
    p.add_argument("--ensemble-size", type=int, default=3)
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="the omitted digits")
    p.add_argument("--out", default="results/distill/regimes")
    p.add_argument("--work-dir", default="/tmp/pycompress_distill_teachers")
    p.add_argument("--summary", action="store_true", help="print the result rows of the JSON files in --out")
    p.add_argument("--only", default="hinton_fractions,omitted_class,shallow_mimic,munge_data_limited")
    args = p.parse_args()
    if args.summary:
        print("\n".join(summary_rows(args.out)))
        return
    torch.set_num_threads(1)  # a shared 2-core machine
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.factors = [int(f) for f in args.factors.split(",")]
    args.digits = [int(d) for d in args.digits.split(",")]
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    data = digits_splits()
    common = dict(epochs=1_000_000, max_steps=args.steps, batch_size=64, optimizer="adam", lr=3e-3,
                  progress=False, output="")
    teacher = get_teacher(os.path.join(args.work_dir, "teacher0.pt"), data.train, data.val, 0, args.teacher_epochs)
    print(f"teacher (full training set): test accuracy {accuracy(teacher, data.test):.4f}", flush=True)
    for name in args.only.split(","):
        start = time.time()
        if name == "munge_data_limited":
            munge_data_limited(args, data, common)
        else:
            globals()[name](args, data, teacher, common)
        print(f"{name}: {time.time() - start:.0f} s\n", flush=True)


if __name__ == "__main__":
    main()
