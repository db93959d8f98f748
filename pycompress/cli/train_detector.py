"""``pycompress train-detector``: trains a detector on the digit-detection data (or a dataset by import path).

Builds a :class:`~pycompress.config.TrainDetectorConfig` (file, flags, ``--set``) and runs
:func:`pycompress.detection.workflow.train_detector`. Runs unchanged under
``torchrun --nproc_per_node=N -m pycompress.cli train-detector ...``::

    pycompress train-detector --detector tiny_yolo --set train.epochs=8 --output tiny.json
    pycompress train-detector --config det.toml --checkpoint-dir ckpt --resume
"""

from pycompress.cli.common import json_object


def configure(parser):
    g = parser.add_argument_group("detector")
    g.add_argument("--detector", help="a registered detector (yolo_teacher, tiny_yolo, deep_narrow_yolo, ssd) or "
                                      "an import path 'pkg.mod:factory' (detector.model)")
    g.add_argument("--detector-kwargs", type=json_object, help="JSON keyword arguments of the detector")
    g.add_argument("--data", help="'pkg.mod:fn' returning detection (train, val, test) (data.dataset)")
    g.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    g.add_argument("--save-model", help="write the trained state_dict here (save_model)")


def run(args) -> int:
    from pycompress.cli.common import common_values
    from pycompress.config import TrainDetectorConfig, load_config
    from pycompress.detection.workflow import train_detector

    values = {**common_values(args), "detector.model": args.detector, "detector.kwargs": args.detector_kwargs,
              "data.dataset": args.data, "train.epochs": args.epochs, "save_model": args.save_model}
    cfg = load_config(TrainDetectorConfig(), args.config, args.overrides, values)
    report = train_detector(cfg)
    test = report["test"] or report["val"] or {}
    print(f"{report['detector']}: {report['params']:,} params, {report['macs'] / 1e6:.1f} M MACs, "
          f"test AP {test.get('AP', float('nan')):.4f} AP50 {test.get('AP50', float('nan')):.4f}, "
          f"{report['train']['images_per_second'] or 0:.1f} training images/s"
          + (f", report {cfg.output}" if cfg.output else ""))
    return 0
