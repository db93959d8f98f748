"""Structural pruning: remove whole channels and get a physically smaller model.

- :class:`DependencyGraph` traces a model (torch.fx) and groups coupled channels
  (conv -> BN -> next conv, residual adds, concat/split offsets, depthwise convs,
  flatten -> Linear); :meth:`DependencyGraph.remove` rewrites the modules.
- Criteria (:mod:`pycompress.prune.criteria`): l1, l2, bn_scale, taylor
  (Molchanov 2017, activation-based), taylor_weight, singh (Singh 2019), random.
- :func:`block_sparsify`: converts Conv2d/Linear layers to block-sparse ones (BSR kernels);
  :func:`fold_batchnorm` folds BatchNorm into the convs before, for inference.
- Op rules (:mod:`pycompress.prune.rules`) and layer pruners (:mod:`pycompress.prune.pruners`)
  are registries: a new layer or function is one registered class.
- :func:`prune` / :class:`Pruner`: a criterion, a schedule (:class:`OneShot`, :class:`Iterative`
  (Molchanov), :class:`Phased` (Singh)) and a :class:`Target` (params / MACs / channels);
  :func:`run_experiment` adds training, fine-tuning and the params / FLOPs / latency / accuracy report.
"""

from pycompress.sparsity.convert import FoldedBatchNorm, block_sparsify, fold_batchnorm  # moved; re-exported
from pycompress.prune.criteria import (CRITERIA, BNScale, Criterion, L1, L2, Random, Singh, Taylor, TaylorWeight,
                                       get_criterion, register_criterion)
from pycompress.prune.graph import (Channels, DependencyGraph, Group, Member, count_params_flops,
                                    load_pruned_state_dict, masked_forward)
from pycompress.prune.pruner import (FineTune, Iterative, OneShot, Phased, Pruner, Schedule, Target, choose_threshold,
                                     induce_sparsity, prune)
from pycompress.prune.pruners import LayerPruner, is_depthwise, register_pruner
from pycompress.prune.rules import Rule, register_rule
from pycompress.prune.schedule import plan_removal, select_units
from pycompress.prune.workflow import compare_latency, format_report, measure_latency, run_experiment
