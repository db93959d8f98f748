"""The issue-6 experiments in small, on the embedded digits (writes JSON under results/distill/).

1. ``strategies.json``: teacher, the no-distillation student and every strategy
   (hinton, logits, noisy_teacher, munge, ensemble of 3 teachers), over seeds.
2. ``munge_curve.json``: MUNGE student accuracy as the transfer set grows
   (factor 0 = teacher labels on the training set only), for the image
   generator (noise + mixup) and MUNGE on pixels.
3. ``hinton_temperature.json``: Hinton KD at T in {1, 2, 4, 8}.
4. ``munge_steps_control.json``: MUNGE x4 makes 5x more optimizer steps per
   epoch; this trains the no-distillation student and the teacher-labelled
   training set alone (factor 0) for 5x the epochs, the same number of steps,
   to separate the transfer set's new inputs from the extra steps.
5. ``baseline_steps.json``: the no-distillation student with as many steps as
   each MUNGE point, ``(1 + factor) * epochs`` epochs.

Every student run uses the same Trainer settings (Adam, lr 3e-3, batch 64,
``--epochs`` epochs); strategy hyperparameters are the library defaults, chosen
before any result was seen. Teachers are trained once per seed and kept in
``--work-dir`` (not committed).

    python scripts/distill_experiments.py --seeds 0,1,2 --epochs 30
"""

import argparse
import json
import os
import time

import torch

from pycompress.data import digits_splits
from pycompress.distill import Hinton, Munge, distill, train_teacher
from pycompress.distill.workflow import load_state_dict
from pycompress.models import student_cnn, teacher_cnn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--factors", default="0,1,2,4,8", help="MUNGE transfer-set sizes, multiples of the train set")
    p.add_argument("--temperatures", default="1,2,4,8")
    p.add_argument("--out", default="results/distill")
    p.add_argument("--work-dir", default="/tmp/pycompress_distill_teachers")
    p.add_argument("--only", default="strategies,munge_curve,hinton_temperature,munge_steps_control,"
                   "baseline_steps")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine
    seeds = [int(s) for s in args.seeds.split(",")]
    data = digits_splits()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)

    teachers = []
    for s in range(3):  # three teachers (seeds 0, 1, 2) for the ensemble; teacher 0 is "the teacher"
        path = os.path.join(args.work_dir, f"teacher{s}.pt")
        torch.manual_seed(s)
        model = teacher_cnn()
        if not os.path.exists(path):
            train_teacher(model, data.train, eval_data=data.val, seed=s, epochs=args.teacher_epochs, lr=1e-3,
                          output=path, progress=False)
        teachers.append(load_state_dict(model, path))

    common = dict(eval_data=data.val, test_data=data.test, seeds=seeds, epochs=args.epochs, batch_size=64,
                  optimizer="adam", lr=3e-3, progress=False)
    only = args.only.split(",")
    if "strategies" in only:
        start = time.time()
        r = distill(student_cnn, teachers, data.train, ["hinton", "logits", "noisy_teacher", "munge", "ensemble"],
                    output=os.path.join(args.out, "strategies.json"), **common)
        print(f"strategies: {time.time() - start:.0f} s\n")
    if "munge_curve" in only:
        start = time.time()
        runs = {f"{gen} x{f}": Munge(transfer_factor=float(f), generator=gen)
                for gen in ("mixup", "munge") for f in args.factors.split(",")}
        distill(student_cnn, teachers[0], data.train, runs, output=os.path.join(args.out, "munge_curve.json"),
                **common)
        print(f"munge curve: {time.time() - start:.0f} s\n")
    if "hinton_temperature" in only:
        start = time.time()
        runs = {f"hinton T={t}": Hinton(temperature=float(t)) for t in args.temperatures.split(",")}
        distill(student_cnn, teachers[0], data.train, runs,
                output=os.path.join(args.out, "hinton_temperature.json"), **common)
        print(f"hinton temperature: {time.time() - start:.0f} s\n")
    if "munge_steps_control" in only:
        start = time.time()
        runs = {"munge x0, 5x epochs": Munge(transfer_factor=0.0)}
        distill(student_cnn, teachers[0], data.train, runs,
                output=os.path.join(args.out, "munge_steps_control.json"), **{**common, "epochs": 5 * args.epochs})
        print(f"munge steps control: {time.time() - start:.0f} s\n")
    if "baseline_steps" in only:
        start = time.time()
        reports = {}
        for f in (float(f) for f in args.factors.split(",") if float(f) > 0):
            epochs = round((1 + f) * args.epochs)
            reports[f"steps of munge x{f:g} ({epochs} epochs)"] = distill(
                student_cnn, teachers[0], data.train, [], **{**common, "epochs": epochs}).report
        with open(os.path.join(args.out, "baseline_steps.json"), "w") as fh:
            json.dump(reports, fh, indent=2)
        print(f"baseline steps: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
