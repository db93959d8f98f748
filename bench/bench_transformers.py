"""A transformers distillation step (forward + backward + optimizer) with the fused loss against the eager one.

Run: python -m pytest bench/bench_transformers.py --benchmark-enable -s
A tiny random LLaMA pair (teacher 2 layers, hidden 256; student 1 layer, hidden 128, both
fp32) on a batch of B x L tokens, at V = 32k and 128k: at these sizes the lm_head and the
loss dominate, which is where the fused path matters. "eager" runs both models' full
forward and the textbook loss on (B, L, V) logits (F.kl_div + F.cross_entropy, shifted,
padding ignored); "fused" is pycompress.integrations.transformers.causal_lm_kd_loss.
Step times come from one subprocess per V that times the two variants interleaved (each
with its own copy of the student and its own optimizer), so a change of the machine's load
hits both alike. Peak memory comes from one subprocess per (V, variant): the resident
memory a step adds over the models and optimizer state, so one variant's allocations
cannot hide or inflate another's.
"""

import json

from bench.common import run_python, write_rows

B, L, T, ALPHA = 4, 128, 2.0, 0.5
VOCABS = (32000, 128000)

_SCRIPT = """
import json, torch, torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from bench.common import interleaved_medians, reset_peak_rss, rss_bytes
from pycompress.integrations.transformers import causal_lm_kd_loss
torch.manual_seed(0)
B, L, V, T, ALPHA = {B}, {L}, {V}, {T}, {ALPHA}

def llama(hidden, layers):
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))

teacher = llama(256, 2).eval()
input_ids = torch.randint(0, V, (B, L))
attention_mask = torch.ones_like(input_ids)
attention_mask[B // 2:, 3 * L // 4:] = 0
batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100))
inputs = dict(input_ids=input_ids, attention_mask=attention_mask)

def eager(student):
    s = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]
    y = batch["labels"][:, 1:]
    valid = y != -100
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(s.transpose(1, 2), y, reduction="none")
    return ((ALPHA * T ** 2 * kl + (1 - ALPHA) * ce) * valid).sum() / valid.sum()

def fused(student):
    return causal_lm_kd_loss(student, teacher, batch, temperature=T, alpha=ALPHA)

def training_step(loss_fn):
    torch.manual_seed(0)
    student = llama(128, 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(student)
        loss.backward()
        optimizer.step()
        return loss.item()
    step()  # creates the optimizer state
    optimizer.zero_grad(set_to_none=True)
    return step

variants = {{"eager": eager, "fused": fused}}
if "{mode}" == "time":
    steps = {{name: training_step(fn) for name, fn in variants.items()}}
    print(json.dumps(interleaved_medians(steps, repeats={repeats}, warmup=1)))
else:
    step = training_step(variants["{mode}"])
    reset_peak_rss()
    base = rss_bytes()
    step()
    print(json.dumps(rss_bytes("VmHWM:") - base))
"""


def _run(V, mode, repeats=5):
    return json.loads(run_python(_SCRIPT.format(B=B, L=L, V=V, T=T, ALPHA=ALPHA, mode=mode, repeats=repeats)))


def test_transformers_distillation_step(benchmark):
    seconds = {V: _run(V, "time") for V in VOCABS}
    peak = {(V, v): _run(V, v) for V in VOCABS for v in ("fused", "eager")}
    benchmark.pedantic(lambda: None, rounds=1)  # the timings above come from their own processes
    print(f"\ntransformers distillation step (fwd+bwd+AdamW), tiny LLaMA teacher h256x2 / student h128x1, "
          f"B={B} L={L} fp32")
    print(f"{'V':>7} {'variant':<8}{'s':>8}{'fused faster by':>17}{'peak extra MiB':>16}{'vs eager':>10}")
    rows = []
    for (V, v), extra in peak.items():
        ratio = seconds[V][v] / seconds[V]["fused"]
        mem_ratio = extra / peak[(V, "eager")]
        print(f"{V:>7} {v:<8}{seconds[V][v]:>8.3f}{ratio:>16.2f}x{extra / 2**20:>16.0f}{mem_ratio:>9.0%}")
        rows.append({"op": "transformers distillation step fwd+bwd+AdamW", "shape": [B, L, V], "dtype": "float32",
                     "baseline": v, "seconds": round(seconds[V][v], 4), "ratio": round(ratio, 3),
                     "peak_extra_mib": round(extra / 2**20, 1), "peak_vs_eager": round(mem_ratio, 3)})
    print("written to", write_rows("transformers_float32", rows))
    assert all(extra > 0 for extra in peak.values())
