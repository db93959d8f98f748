"""The one cost model: parameters, MACs, FLOPs and latency.

- **MACs** are the multiply-accumulates of convolutions (``out elements x in/groups x
  kernel``) and linear layers (``out elements x in_features``), measured with forward
  hooks on an example input. A block-sparse layer counts the MACs its kernel
  really performs: the dense layer's times the kept-block density (its dense
  fallback counts in full).
- **FLOPs** are always ``2 x MACs`` (a multiply and an add), and always named so.
  Reports carry both keys, ``macs`` and ``flops``, so nobody has to guess.
- **Latency** is measured interleaved (A B A B ...), so machine noise hits all
  models alike; compare models from one call, never across calls.

Pruning (reports and targets are ratios, identical for MACs and FLOPs),
``block_sparsify``, the block-sparsify experiment and the benchmarks all count here.
"""

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = ["Cost", "count_params", "layer_macs", "count_macs", "count_flops", "measure_cost", "measure_latency",
           "compare_latency"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Cost:
    """Parameters, and MACs / FLOPs (``= 2 x macs``) per example."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> Dict[str, int]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


def example_tuple(example_inputs) -> tuple:
    """``example_inputs`` as the tuple of Tensors a model is called with (a lone Tensor is wrapped)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a non-empty tuple of Tensors, got "
                    f"{type(example_inputs).__name__}")


def count_params(model: nn.Module) -> int:
    """Every parameter element of ``model`` (a block-sparse layer's stored blocks only)."""
    return sum(p.numel() for p in model.parameters())


def _macs_per_output(m: nn.Module) -> Optional[float]:
    if hasattr(m, "_gemm_shape") and hasattr(m, "dense_reason"):  # BlockSparseConv2d / BlockSparseLinear
        return m._gemm_shape[1] * (1.0 if m.dense_reason() else m.density)
    if isinstance(m, _CONV):
        return m.weight.shape[1] * math.prod(m.weight.shape[2:])
    if isinstance(m, nn.Linear):
        return m.in_features
    return None


def layer_macs(model: nn.Module, example_inputs, names: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """MACs of each conv / linear layer (or of the modules ``names``) over one forward of ``example_inputs``
    (the whole batch), in eval mode without gradients."""
    inputs = example_tuple(example_inputs)
    wanted = None if names is None else set(names)
    out: Dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if (wanted is None or name in wanted) and _macs_per_output(m) is not None:
            handles.append(m.register_forward_hook(
                lambda mod, args, y, name=name: out.__setitem__(name, round(y.numel() * _macs_per_output(mod)))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out


def count_macs(model: nn.Module, example_inputs) -> int:
    """MACs per example (the batch's total divided by its size)."""
    inputs = example_tuple(example_inputs)
    return sum(layer_macs(model, inputs).values()) // inputs[0].shape[0]


def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs per example: ``2 x`` :func:`count_macs`."""
    return 2 * count_macs(model, example_inputs)


def measure_cost(model: nn.Module, example_inputs) -> Cost:
    """:class:`Cost` of ``model``: parameters and per-example MACs (FLOPs = 2 x MACs)."""
    return Cost(count_params(model), count_macs(model, example_inputs))


def _check_rounds(repeats, warmup):
    for name, v in (("repeats", repeats), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "repeats" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'repeats' else 0}, got {v!r}")


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each zero-argument callable, timed round-robin (A B A B ...) after
    ``warmup`` untimed rounds, so machine noise hits every callable alike."""
    _check_rounds(repeats, warmup)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


@torch.inference_mode()
def compare_latency(models: Dict[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                    repeats: int = 30, warmup: int = 5) -> Dict[str, Dict[str, float]]:
    """Median forward times (ms) of several models on random inputs, interleaved (A B A B ...).

    Returns:
        dict: ``name -> {"threads": n, "batch{b}_ms": median ms, ...}``.
    """
    _check_rounds(repeats, warmup)
    out = {name: {"threads": torch.get_num_threads()} for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for bs in batch_sizes:
            x = torch.randn(bs, *input_shape)
            seconds = interleaved_medians({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats, warmup)
            for name, sec in seconds.items():
                out[name][f"batch{bs}_ms"] = 1e3 * sec
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return out


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                    repeats: int = 30, warmup: int = 5) -> Dict[str, float]:
    """Median forward time (ms) per batch size of one model (see :func:`compare_latency`)."""
    return compare_latency({"model": model}, input_shape, batch_sizes, repeats, warmup)["model"]
