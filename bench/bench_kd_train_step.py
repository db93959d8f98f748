"""One distillation training step with the fused KD loss, against the same step with eager and
torch.compile losses: the ratio a user feels, where bench_kd_loss.py isolates the loss.

Run: python -m pytest bench/bench_kd_train_step.py --benchmark-enable -s
A step is a small student's forward (an MLP with a vocabulary-sized head), the loss against
given teacher logits, backward and an AdamW step. The three variants share the model and the
optimizer and are timed interleaved; the activations, the head's gradients and the optimizer's
buffers come and go between the loss calls as in real training.
"""

import torch

from bench.bench_kd_loss import T, V, compiled_kd, eager_kd, fused_kd
from bench.common import interleaved_medians, write_rows

N, D_IN, HIDDEN = 1024, 256, 256


def test_kd_train_step(benchmark):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, V))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randn(N, D_IN)
    teacher_logits = torch.randn(N, V) * 3

    def step_with(loss_fn):
        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(student(x), teacher_logits).backward()
            opt.step()
        return step

    variants = {"pycompress": step_with(fused_kd), "eager": step_with(eager_kd),
                "torch.compile": step_with(compiled_kd)}
    med = interleaved_medians(variants, repeats=5, warmup=3)
    benchmark.pedantic(variants["pycompress"], rounds=3, warmup_rounds=1)

    rows = []
    print(f"\nKD training step (MLP {D_IN}-{HIDDEN}-{V}, N={N}, T={T}, AdamW), fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'loss':<14}{'step ms':>9}{'ours faster by':>16}")
    for v, sec in med.items():
        ratio = sec / med["pycompress"]
        print(f"{v:<14}{sec * 1e3:>9.1f}{ratio:>15.2f}x")
        rows.append({"op": "kd train step", "shape": [N, D_IN, HIDDEN, V], "dtype": "float32", "baseline": v,
                     "ms": round(sec * 1e3, 2), "ratio": round(ratio, 3)})
    print("written to", write_rows("kd_train_step", rows))
    assert med["pycompress"] > 0
