"""``pycompress distill`` (this module) and ``pycompress train-teacher`` (:mod:`.teacher_cli`).

Both read the same config file (see :mod:`pycompress.distill.config`); flags
are shorthands for ``--set`` overrides, applied after the file. Both run
unchanged under ``torchrun --nproc_per_node=N -m pycompress.cli ...``.

    pycompress train-teacher --output teacher.pt
    pycompress distill --teacher-checkpoint teacher.pt --strategy hinton,logits --seeds 0,1,2
"""

import json


def _common(parser):
    parser.add_argument("--config", help="TOML (.toml) or YAML (.yaml/.yml) config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set strategy.hinton.temperature=8 (repeatable)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _flag_overrides(args, train_key: str) -> list:
    out = []
    if args.device is not None:
        out.append(f"{train_key}.device={json.dumps(args.device)}")
    if args.epochs is not None:
        out.append(f"{train_key}.epochs={args.epochs}")
    if args.no_progress:
        out.append(f"{train_key}.progress=false")
    return out


def _trainer_options(t) -> dict:
    return dict(epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                weight_decay=t.weight_decay, grad_accum=t.grad_accum, amp=t.amp, scheduler=t.scheduler,
                clip_grad_norm=t.clip_grad_norm or None, device=t.device, progress=t.progress)


def _ints(text: str) -> str:
    return json.dumps([int(s) for s in text.split(",") if s.strip()])


def configure(parser):
    _common(parser)
    parser.add_argument("--strategy", help="comma-separated strategies: hinton, logits, noisy_teacher, munge, "
                        "ensemble")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--teacher-checkpoint", action="append", default=None, metavar="PATH",
                        help="teacher state_dict (repeat for an ensemble)")
    parser.add_argument("--output", help="JSON report path")
    parser.add_argument("--checkpoint-dir", help="one resumable checkpoint per run here")


def run(args) -> int:
    from pycompress.distill.config import load_config
    from pycompress.distill.imports import build_model, load_data
    from pycompress.distill.workflow import distill, load_state_dict

    overrides = _flag_overrides(args, "train")
    if args.strategy is not None:
        overrides.append(f"strategies={json.dumps([s.strip() for s in args.strategy.split(',') if s.strip()])}")
    if args.seeds is not None:
        overrides.append(f"seeds={_ints(args.seeds)}")
    if args.teacher_checkpoint is not None:
        overrides.append(f"teacher.checkpoints={json.dumps(args.teacher_checkpoint)}")
    if args.output is not None:
        overrides.append(f"output={json.dumps(args.output)}")
    if args.checkpoint_dir is not None:
        overrides.append(f"checkpoint_dir={json.dumps(args.checkpoint_dir)}")
    if args.resume:
        overrides.append("resume=true")
    cfg = load_config(args.config, overrides + args.overrides)
    if not cfg.teacher.checkpoints:
        raise ValueError("missing teacher: set teacher.checkpoints in the config or pass --teacher-checkpoint "
                         "(train one with `pycompress train-teacher --output teacher.pt`)")
    teachers = [load_state_dict(build_model(cfg.teacher.model, cfg.teacher.kwargs, "teacher.model"), path)
                for path in cfg.teacher.checkpoints]
    train, val, test = load_data(cfg.data.dataset, cfg.data.kwargs)

    def student():
        return build_model(cfg.student.model, cfg.student.kwargs, "student.model")

    distill(student, teachers, train, cfg.strategies, strategy_options=cfg.strategy, eval_data=val, test_data=test,
            seeds=cfg.seeds, baseline=cfg.baseline, cache_teacher=cfg.cache_teacher,
            checkpoint_dir=cfg.checkpoint_dir or None, resume=cfg.resume, report_path=cfg.output,
            **_trainer_options(cfg.train))
    return 0
