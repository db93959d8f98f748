"""``pycompress train-teacher``: trains the teacher of a distillation config and saves its state_dict.

Reads the same config as ``pycompress distill`` (its ``teacher``, ``teacher.train``
and ``data`` sections)::

    pycompress train-teacher --output teacher.pt --seed 0
    pycompress train-teacher --config distill.toml --set teacher.train.epochs=5 --output t1.pt --seed 1
"""

from pycompress.distill.cli import _common, _flag_overrides, _trainer_options


def configure(parser):
    _common(parser)
    parser.add_argument("--output", default="teacher.pt", help="where to write the state_dict (default teacher.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    parser.add_argument("--checkpoint", help="resumable training checkpoint (for --resume)")


def run(args) -> int:
    import torch

    from pycompress.distill.config import load_config
    from pycompress.distill.imports import build_model, load_data
    from pycompress.distill.workflow import _is_main, train_teacher

    cfg = load_config(args.config, _flag_overrides(args, "teacher.train") + args.overrides)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs)
    torch.manual_seed(args.seed)
    teacher = build_model(cfg.teacher.model, cfg.teacher.kwargs, "teacher.model")
    out = train_teacher(teacher, train, eval_data=val, test_data=test, seed=args.seed, output=args.output,
                        checkpoint_path=args.checkpoint, resume=args.resume, **_trainer_options(cfg.teacher.train))
    if _is_main():
        print(f"teacher: {out['parameters']:,} parameters, {out['evaluated_on']} accuracy {out['accuracy']:.4f}, "
              f"saved to {args.output}")
    return 0
