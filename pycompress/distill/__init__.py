"""Distillation workflows: Hinton KD, Ba & Caruana logit regression, Sau's noisy teacher,
Buciluǎ's MUNGE transfer sets and teacher ensembles, on the shared Trainer.

Python API::

    from pycompress.distill import distill
    result = distill(student_cnn, teacher, data.train, strategy=["hinton", "munge"],
                     eval_data=data.val, test_data=data.test, seeds=[0, 1, 2])

Command line: ``pycompress train-teacher`` and ``pycompress distill`` (see
:mod:`pycompress.cli.distill`); both build a :class:`pycompress.config.DistillConfig`.
"""

from pycompress.distill.strategies import (STRATEGIES, Ensemble, Hinton, LogitRegression, MehtaOzturk, Munge,
                                           NoisyTeacher, Strategy, make_strategy)
from pycompress.distill.workflow import (DistillResult, distill, distill_from_config, format_table, train_teacher,
                                         train_teacher_from_config)

__all__ = ["distill", "distill_from_config", "train_teacher", "train_teacher_from_config", "DistillResult",
           "format_table", "STRATEGIES", "Strategy", "Hinton", "LogitRegression", "NoisyTeacher", "Munge", "Ensemble", "make_strategy",
           "MehtaOzturk"]
