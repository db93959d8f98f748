"""DistributedDataParallel on CPU: 2 gloo processes under torchrun equal 1 process at the same global batch.

The worker script runs the distillation workflow itself (``distill``), so this
checks the whole path: ``init_distributed`` from torchrun's environment, the
DDP wrap, the DistributedSampler shard in ``Trainer.epoch_batches`` and rank-0
checkpoints. Processes are started by ``torch.distributed.run`` (torchrun),
never by hand.
"""

import os
import socket
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent("""
    import sys

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from pycompress.distill import distill
    from pycompress.train import init_distributed


    def net(hidden):
        return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 5))


    def run(batch_size, out, checkpoint_dir):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(72, 16, generator=g)
        y = torch.randint(0, 5, (72,), generator=g)
        torch.manual_seed(1)
        teacher = net(32)

        def student():
            return net(8)

        result = distill(student, teacher, TensorDataset(x, y), "hinton", seeds=[0], baseline=False, epochs=3,
                         batch_size=batch_size, optimizer="sgd", lr=0.2, progress=False, print_table=False,
                         checkpoint_dir=checkpoint_dir)
        model = result.students["hinton"][0]
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            torch.save({"state": model.state_dict(), "world_size": result.report["training"]["world_size"]}, out)


    if __name__ == "__main__":
        distributed = init_distributed()
        # the same global batch: 12 in one process, 6 per rank in two
        run(int(sys.argv[1]) // (torch.distributed.get_world_size() if distributed else 1), sys.argv[2], sys.argv[3])
        if distributed:
            torch.distributed.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("WORLD_SIZE", None)
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), "12", str(single), str(tmp_path / "ck1")], env=env, check=True,
                   timeout=120)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), "12",
                           str(double), str(tmp_path / "ck2")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single, weights_only=True)
    b = torch.load(double, weights_only=True)
    assert (a.pop("world_size"), b.pop("world_size")) == (1, 2)
    a, b = a["state"], b["state"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # the trained weights moved away from their initialisation (the comparison is not trivially true)
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    assert not torch.allclose(init[1].weight, a["1.weight"], atol=1e-3)
    # rank 0 wrote the run's checkpoint (one file, complete and loadable)
    ckpt = torch.load(tmp_path / "ck2" / "hinton_seed0.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 3
