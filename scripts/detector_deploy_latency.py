"""Latency of a dense and a pruned detector as deployed: PyTorch (dense, pruned, pruned + block_sparsify,
interleaved in this process) and ONNX Runtime (dense, pruned, each in a process of its own).

    python scripts/detector_deploy_latency.py --detector-kwargs '{"name": "ssd", "width": 8}' \\
        --dense results/detection/prune/ssd_dense.pt --pruned results/detection/prune/ssd_singh.pt \\
        --output results/detection/prune/ssd_deploy_latency.json
"""

import argparse
import json
import os
import tempfile

import torch


def main(argv=None):
    from pycompress.cli.common import atomic_write_json
    from pycompress.cost import compare_latency, measure_cost
    from pycompress.models.detection import build_detector
    from pycompress.prune import load_pruned_state_dict
    from pycompress.prune.deploy import export_onnx, onnx_latency
    from pycompress.sparsity import block_sparsify

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector-kwargs", type=json.loads, required=True, help="build_detector keyword arguments")
    p.add_argument("--dense", required=True, help="the dense state_dict")
    p.add_argument("--pruned", required=True, help="the pruned state_dict (load_pruned_state_dict)")
    p.add_argument("--sparsity", type=float, default=0.75, help="block_sparsify sparsity of the pruned detector")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense = build_detector(**args.detector_kwargs).eval()
    dense.load_state_dict(torch.load(args.dense, weights_only=True))
    pruned = load_pruned_state_dict(build_detector(**args.detector_kwargs), torch.load(args.pruned, weights_only=True))
    pruned.eval()
    sparse = block_sparsify(pruned, args.sparsity, fold_bn=True, inplace=False).model.eval()
    shape = (3, dense.image_size, dense.image_size)
    x = torch.rand(1, *shape)
    with torch.no_grad():
        rows = {"pytorch": compare_latency({"dense": dense, "pruned": pruned,
                                            f"pruned+block_sparse{args.sparsity}": sparse}, shape, args.batch_sizes)}
        rows["onnxruntime"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in (("dense", dense), ("pruned", pruned)):
                rows["onnxruntime"][name] = {"threads": args.threads}
                for b in args.batch_sizes:  # exported at each batch size: static shapes, as deployed
                    path = export_onnx(model, torch.rand(b, *shape), os.path.join(tmp, f"{name}{b}.onnx"))
                    rows["onnxruntime"][name][f"batch{b}_ms"] = onnx_latency(path, (b, *shape), threads=args.threads)
    report = {"args": vars(args), "params": {"dense": measure_cost(dense, x).params, "pruned": measure_cost(pruned, x).params},
              "latency_ms": rows}
    atomic_write_json(report, args.output)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
