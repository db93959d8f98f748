"""Distil a tiny LLaMA teacher into a smaller student with the fused KD loss; no download.

    python examples/distill_llama_tiny.py [--vocab-size 32000] [--steps 40]

Both models are built from LlamaConfig in code and randomly initialised. The data are
synthetic token sequences over 64 of the vocabulary's ids, each token a fixed random
function of the previous one (a bigram rule), right-padded to random lengths. The
teacher (4 layers, hidden 128) first learns the rule with its own causal-LM loss; the
student (2 layers, hidden 64, tied embeddings) is then distilled from it through
pycompress.integrations.transformers.causal_lm_kd_loss, which never materialises the
(tokens x vocabulary) logits of either model. The printed distillation loss falls.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pycompress.integrations.transformers import causal_lm_kd_loss


def tiny_llama(vocab_size, hidden, layers, tie):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def batch_of_sequences(generator, used, rule, batch, length):
    """input_ids, attention_mask and labels (padding = -100) of sequences that start at one of the
    ``used`` ids and continue with token i + 1 = rule[token i]."""
    tokens = [used[torch.randint(0, len(used), (batch,), generator=generator)]]
    for _ in range(length - 1):
        tokens.append(rule[tokens[-1]])
    input_ids = torch.stack(tokens, 1)
    lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=generator)
    attention_mask = (torch.arange(length) < lengths).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                labels=input_ids.masked_fill(attention_mask == 0, -100))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=30, help="distillation steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (KD) term")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    used = torch.randperm(args.vocab_size, generator=data)[:64]  # the ids the data use
    rule = torch.zeros(args.vocab_size, dtype=torch.long)
    rule[used] = used[torch.randperm(64, generator=data)]  # the next token of each used id
    teacher = tiny_llama(args.vocab_size, hidden=128, layers=4, tie=False)
    student = tiny_llama(args.vocab_size, hidden=64, layers=2, tie=True)

    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(args.teacher_steps):
        loss = teacher(**batch_of_sequences(data, used, rule, args.batch, args.length)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"teacher: causal-LM loss {loss.item():.3f} after {args.teacher_steps} steps")

    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(args.steps):
        batch = batch_of_sequences(data, used, rule, args.batch, args.length)
        loss = causal_lm_kd_loss(student, teacher, batch, temperature=args.temperature, alpha=args.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"student step {step:3d}: distillation loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
