"""What a prune experiment optimises and measures, per kind of model: one registered class each.

A task gives the loss that fine-tuning, sparsity induction and data-driven criteria (Taylor)
use, ``loss_fn(model, batch) -> loss``, and the evaluation that the report, Singh's threshold
and the per-step records use, ``evaluate(model, data) -> dict``, whose ``metric`` key is the
quality (a classifier's accuracy, a detector's AP50). The workflow looks the task up by name
(``PruneConfig.task``) or, for ``"auto"``, takes the first registered task that ``accepts``
the model, so no stage of the workflow asks what kind of model it has.
"""

from typing import Dict, List

from torch import nn

__all__ = ["Task", "ClassificationTask", "DetectionTask", "register_task", "get_task", "TASKS"]

TASKS: Dict[str, type] = {}


def register_task(cls):
    """Class decorator: registers a :class:`Task` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not cls.name:
        raise TypeError(f"register_task decorates Task subclasses with a name, got {cls!r}")
    TASKS[cls.name] = cls
    return cls


class Task:
    """Loss and evaluation of one kind of model. Subclasses set ``name``, ``metric``, ``metrics``."""

    name = ""
    metric = ""                  # the quality key of evaluate()
    metrics: List[str] = []      # the keys the report keeps

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """True if this task can train and evaluate ``model``."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raises TypeError naming the model when this task cannot handle it."""
        if not self.accepts(model):
            raise TypeError(f"task {self.name!r} cannot handle {type(model).__name__}: {self.requirement}")

    requirement = ""

    def loss_fn(self, model: nn.Module, batch):
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data) -> Dict[str, float]:
        raise NotImplementedError


@register_task
class DetectionTask(Task):
    """A detector of :mod:`pycompress.models.detection` on detection data (items ``(image, boxes,
    labels[, labeled])``): its own criterion on its own encoded targets; COCO AP50 and AP."""

    name = "detection"
    metric = "AP50"
    metrics = ["AP50", "AP", "AP75"]
    requirement = "a detection task needs a detector with encode_targets, criterion and postprocess"

    def __init__(self, loss: Dict = None, score_threshold: float = 0.01, iou_threshold: float = 0.5,
                 max_detections: int = 100):
        self.loss_options = dict(loss or {})
        self.postprocess = dict(score_threshold=score_threshold, iou_threshold=iou_threshold,
                                max_detections=max_detections)
        self._criteria: Dict[type, nn.Module] = {}

    @classmethod
    def accepts(cls, model):
        return all(callable(getattr(model, a, None)) for a in ("encode_targets", "criterion", "postprocess"))

    def loss_fn(self, model, batch):
        # targets are encoded by the model being trained: a pruned copy keeps its default boxes / anchors
        if type(model) not in self._criteria:
            self.check(model)
            self._criteria[type(model)] = model.criterion(**self.loss_options)
        images, boxes, labels = batch[0], batch[1], batch[2]
        labeled = batch[3] if len(batch) > 3 else None
        return self._criteria[type(model)](model(images), *model.encode_targets(boxes, labels, labeled))

    def evaluate(self, model, data):
        from pycompress.detection.evaluate import evaluate

        self.check(model)
        result = evaluate(model, data, **self.postprocess)
        return {k: result[k] for k in self.metrics}


@register_task
class ClassificationTask(Task):
    """A classifier on ``(x, y)`` batches: cross-entropy; top-1 accuracy."""

    name = "classification"
    metric = "accuracy"
    metrics = ["accuracy"]

    @classmethod
    def accepts(cls, model):
        return True

    def loss_fn(self, model, batch):
        from pycompress.train import cross_entropy_step

        return cross_entropy_step(model, batch)

    def evaluate(self, model, data):
        from pycompress.train import evaluate_classifier

        return {"accuracy": evaluate_classifier(model, data)["accuracy"]}


def get_task(name: str, model: nn.Module, **options) -> Task:
    """The task ``name`` (``"auto"``: the first registered one that accepts ``model``), checked on it."""
    if name == "auto":
        cls = next(c for c in TASKS.values() if c.accepts(model))
    elif name in TASKS:
        cls = TASKS[name]
    else:
        raise ValueError(f"task must be 'auto' or one of {sorted(TASKS)}, got {name!r}")
    task = cls(**options) if options else cls()
    task.check(model)
    return task
