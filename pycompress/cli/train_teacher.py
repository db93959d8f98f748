"""``pycompress train-teacher``: trains the teacher of a distillation config and saves its state_dict.

Reads the same config as ``pycompress distill`` (its ``teacher``, ``teacher.train``
and ``data`` sections). The state_dict goes to ``--output``, else the first of
``teacher.checkpoints``, else ``teacher.pt``::

    pycompress train-teacher --output teacher.pt --seed 0
    pycompress train-teacher --config distill.toml --set teacher.train.epochs=5 --output t1.pt --seed 1
"""


def configure(parser):
    parser.add_argument("--epochs", type=int, help="teacher epochs (teacher.train.epochs)")


def run(args) -> int:
    from pycompress.cli.common import common_values
    from pycompress.config import DistillConfig, load_config
    from pycompress.distill.workflow import train_teacher_from_config
    from pycompress.train import is_main_process

    values = {**common_values(args), "output": None, "teacher.train.epochs": args.epochs}
    if args.seed is None and args.seeds is None:
        values["seeds"] = [0]  # one teacher, not the students' three seeds
    cfg = load_config(DistillConfig(), args.config, args.overrides, values)
    output = args.output or (cfg.teacher.checkpoints[0] if cfg.teacher.checkpoints else "teacher.pt")
    out = train_teacher_from_config(cfg, output)
    if is_main_process():
        print(f"teacher: {out['parameters']:,} parameters, {out['evaluated_on']} accuracy {out['accuracy']:.4f}, "
              f"saved to {output}")
    return 0
