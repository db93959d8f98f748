"""``pycompress distill``: baseline and distilled students over seeds, one report.

Config: :class:`pycompress.config.DistillConfig` (file, ``--set``, the flags below)::

    pycompress distill --teacher-checkpoint teacher.pt --strategy hinton,logits --seeds 0,1,2

Detectors (docs/detection_distill.md)::

    pycompress distill --strategy mehta_ozturk --teacher-checkpoint yolo_teacher.pt \
        --set teacher.model=yolo_teacher --set student.model=tiny_yolo \
        --set data.dataset=pycompress.data:digit_detection_splits --unlabeled-ratio 1
"""


def configure(parser):
    parser.add_argument("--strategy", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help="comma-separated strategies: hinton, logits, noisy_teacher, munge, ensemble; "
                             "mehta_ozturk for detectors")
    parser.add_argument("--teacher-checkpoint", action="append", default=None, metavar="PATH",
                        help="teacher state_dict (repeat for an ensemble)")
    parser.add_argument("--epochs", type=int, help="student epochs (train.epochs)")
    parser.add_argument("--unlabeled-ratio", type=float,
                        help="detection: unlabeled images mixed in, x the labeled set (detection.unlabeled_ratio)")


def load(args):
    """The :class:`DistillConfig` of parsed ``args``: defaults, file, flags, then ``--set``."""
    from pycompress.cli.common import common_values
    from pycompress.config import DistillConfig, load_config

    values = {**common_values(args), "strategies": args.strategy, "teacher.checkpoints": args.teacher_checkpoint,
              "train.epochs": args.epochs, "detection.unlabeled_ratio": args.unlabeled_ratio}
    return load_config(DistillConfig(), args.config, args.overrides, values)


def run(args) -> int:
    from pycompress.distill.workflow import distill_from_config

    distill_from_config(load(args))
    return 0
