"""``pycompress train-detector``: trains a detector on the digit-detection data (or a dataset by import path).

A thin layer over :func:`pycompress.detection.workflow.train_detector`: the flags are
shorthands for ``--set`` keys of :class:`~pycompress.detection.workflow.DetectionTrainConfig`,
applied after the config file. Runs unchanged under ``torchrun --nproc_per_node=N -m pycompress.cli``.

    pycompress train-detector --set detector=yolo_teacher --set epochs=10 --output teacher.json
    pycompress train-detector --config det.toml --set detector=tiny_yolo --checkpoint-dir ckpt --resume
"""

import argparse
import json
import shlex


def configure(parser):
    parser.add_argument("--config", help="TOML (.toml) or YAML (.yaml/.yml) file of DetectionTrainConfig keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set detector=tiny_yolo (repeatable)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="seed of the initialisation and data order")
    parser.add_argument("--output", help="JSON report path")
    parser.add_argument("--save-model", help="write the trained state_dict here")
    parser.add_argument("--checkpoint-dir", help="resumable training checkpoint here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm bars (default on)")


def run(args) -> int:
    from pycompress.detection.workflow import load_detection_config, train_detector

    flags = []
    for key in ("device", "seed", "output", "save_model", "checkpoint_dir", "progress"):
        value = getattr(args, key)
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    if args.resume:
        flags.append("resume=true")
    cfg = load_detection_config(args.config, flags + args.overrides)
    # the command as parsed (sys.argv is another program's when main() is called from Python)
    words = ["pycompress", "train-detector"] + (["--config", args.config] if args.config else [])
    words += [w for item in args.overrides + flags for w in ("--set", item)]
    report = train_detector(cfg, command=shlex.join(words))
    test = report["test"] or report["val"] or {}
    print(f"{report['detector']}: {report['params']:,} params, {report['macs'] / 1e6:.1f} M MACs, "
          f"test AP {test.get('AP', float('nan')):.4f} AP50 {test.get('AP50', float('nan')):.4f}, "
          f"{report['train']['images_per_second'] or 0:.1f} training images/s"
          + (f", report {cfg.output}" if cfg.output else ""))
    return 0
