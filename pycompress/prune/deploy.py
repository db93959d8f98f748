"""Deploying a pruned model: ONNX export with a clear refusal of pycompress's custom-op layers,
and ONNX Runtime inference and latency in a process of its own.

A pruned model is a plain ``torch.nn`` model of smaller shapes, so it saves (``state_dict``,
reloaded with :func:`~pycompress.prune.load_pruned_state_dict` under ``weights_only=True``),
compiles (``torch.compile``) and exports (``torch.export``) like any other. Block-sparse layers
(:func:`pycompress.sparsity.block_sparsify`) run pycompress's own ops, which ONNX has no operator
for: :func:`export_onnx` names such a layer instead of failing inside the exporter.
Needs the ``deploy`` extra (``onnx``, ``onnxruntime``, ``onnxscript``).
"""

import json
import os
import subprocess
import sys
from typing import List, Sequence

import torch
from torch import nn

from pycompress.cost import example_tuple

__all__ = ["export_onnx", "onnx_custom_op_layers", "run_onnx", "onnx_latency"]


def onnx_custom_op_layers(model: nn.Module) -> List[str]:
    """Names of the layers of ``model`` that run pycompress custom ops (no ONNX operator exists)."""
    from pycompress.nn.block_sparse import BlockSparseConv2d, BlockSparseLinear

    return [name for name, m in model.named_modules() if isinstance(m, (BlockSparseConv2d, BlockSparseLinear))]


def export_onnx(model: nn.Module, example_inputs, path: str, *, output_names: Sequence[str] = None,
                opset_version: int = None) -> str:
    """Exports ``model`` (eval mode) to ONNX at ``path`` with torch.onnx's dynamo exporter.

    Args:
        model (nn.Module): a dense or pruned model.
        example_inputs (Tensor | tuple): inputs of one forward, e.g. ``(1, 3, 64, 64)`` images.
        path (str): the ``.onnx`` file to write.
        output_names (sequence of str, optional): names of the graph outputs.
        opset_version (int, optional): the ONNX opset; default the exporter's (older
            runtimes such as DeepSparse 1.8 read opsets up to 19).

    Returns:
        str: ``path``.

    Raises:
        TypeError: ``model`` has block-sparse layers (named in the message).
        ImportError: the ``deploy`` extra is not installed.
    """
    custom = onnx_custom_op_layers(model)
    if custom:
        raise TypeError(f"cannot export to ONNX: layer {custom[0]!r} ({type(model.get_submodule(custom[0])).__name__})"
                        f" runs a pycompress custom op that ONNX has no operator for"
                        f"{f' (and {len(custom) - 1} more)' if len(custom) > 1 else ''}; export before "
                        "block_sparsify, or keep these layers dense with exclude=")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail here with the extra's name)
    except ImportError as e:
        raise ImportError("ONNX export needs the deploy extra: pip install 'pycompress[deploy]'") from e
    model = model.eval()
    program = torch.onnx.export(model, example_tuple(example_inputs), dynamo=True, verbose=False,
                                output_names=list(output_names) if output_names else None,
                                opset_version=opset_version)
    program.save(path)
    return path


def run_onnx(path: str, *inputs, threads: int = 1) -> List:
    """Runs the ONNX model at ``path`` in ONNX Runtime (CPU) on numpy or tensor ``inputs``; numpy outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: (x.numpy() if isinstance(x, torch.Tensor) else x) for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


_LATENCY_SCRIPT = """
import json, sys, time
import numpy as np
import onnxruntime as ort
path, shape, threads, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
o = ort.SessionOptions()
o.intra_op_num_threads = o.inter_op_num_threads = threads
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
feed = {s.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
for _ in range(3):
    s.run(None, feed)
times = []
for _ in range(runs):
    t = time.perf_counter(); s.run(None, feed); times.append(time.perf_counter() - t)
print(json.dumps(1000 * float(np.median(times))))
"""


def onnx_latency(path: str, input_shape: Sequence[int], *, threads: int = 1, runs: int = 30) -> float:
    """Median ONNX Runtime latency (ms) of the model at ``path`` on one ``input_shape`` batch, measured in
    a process of its own (ORT's spinning worker threads slow other runtimes sharing a process)."""
    out = subprocess.run([sys.executable, "-c", _LATENCY_SCRIPT, os.fspath(path), json.dumps(list(input_shape)),
                          str(threads), str(runs)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"ONNX Runtime latency of {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
