"""The transformers integration against the eager loss on full logits (tiny random LLaMA configs)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pycompress

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers "
                                                          "(pip install -e '.[hf]')")
from pycompress.integrations.transformers import (  # noqa: E402
    DistillationTrainer, causal_lm_kd_loss, distillation_trainer, shifted_targets, teacher_topk)

V = 61


def _llama(hidden, layers, seed, tie=False, bias=False, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
    if bias:  # LLaMA has none; other architectures' heads do
        model.lm_head.bias = torch.nn.Parameter(torch.randn(V) * 0.5)
    return model.to(dtype)


def _batch(seed=0, B=3, L=10):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not trained on
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _eager_loss(student, teacher, batch, temperature, alpha):
    """The textbook loss: full logits, transformers' classic shift (drop the last logit, the first label)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]
    y = batch["labels"][:, 1:]
    valid = y != -100
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(s.transpose(1, 2), y, ignore_index=-100, reduction="none")
    return ((alpha * temperature ** 2 * kl + (1 - alpha) * ce) * valid).sum() / valid.sum()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(got, want, rtol, atol):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("tie,bias", ((False, False), (True, False), (False, True)))
def test_loss_and_gradients_equal_eager_float64(tie, bias):
    """Student hidden 16 (tied or not, with or without an lm_head bias), teacher hidden 24."""
    student = _llama(16, 1, seed=0, tie=tie, bias=bias, dtype=torch.float64)
    teacher = _llama(24, 2, seed=1, bias=bias, dtype=torch.float64).eval()
    if tie:
        assert student.lm_head.weight is student.model.embed_tokens.weight
    batch = _batch()
    fused = _loss_and_grads(student, lambda: causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.6,
                                                               chunk_size=7))
    eager = _loss_and_grads(student, lambda: _eager_loss(student, teacher, batch, 2.0, 0.6))
    _assert_same(fused, eager, rtol=1e-9, atol=1e-11)


def test_alpha_zero_is_the_models_own_causal_lm_loss():
    student, teacher, batch = _llama(16, 1, seed=0), _llama(24, 1, seed=1), _batch()
    loss = causal_lm_kd_loss(student, teacher, batch, alpha=0.0)
    torch.testing.assert_close(loss, student(**batch).loss)


def test_shifted_targets_ignore_padding_and_the_last_position():
    batch = _batch()
    del batch["labels"]  # defaults to input_ids, padding masked through attention_mask
    y = shifted_targets(batch)
    assert y.shape == batch["input_ids"].shape
    assert (y[:, -1] == -100).all()
    assert torch.equal(y[0, :-1], batch["input_ids"][0, 1:])
    assert (y[1, 6:] == -100).all() and torch.equal(y[1, :6], batch["input_ids"][1, 1:7])


def test_num_items_in_batch_divides_the_sum():
    student, teacher, batch = _llama(16, 1, seed=0), _llama(24, 1, seed=1), _batch()
    n_valid = int((shifted_targets(batch) != -100).sum())
    mean = causal_lm_kd_loss(student, teacher, batch, temperature=2.0)
    over_more = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, num_items_in_batch=3 * n_valid)
    torch.testing.assert_close(over_more, mean / 3)


def test_teacher_topk_is_the_top_of_the_full_log_softmax():
    teacher, batch = _llama(24, 1, seed=1), _batch()
    values, indices = teacher_topk(teacher, batch, 5, chunk_size=4)
    full = torch.log_softmax(teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits, -1)
    want = full.topk(5, -1)
    torch.testing.assert_close(values, want.values.detach())
    assert torch.equal(indices, want.indices)


@pytest.mark.parametrize("tail", ("bucket", "drop"))
def test_topk_teacher_equals_kd_loss_on_full_student_logits(tail):
    student, teacher, batch = _llama(16, 1, seed=0, dtype=torch.float64), _llama(24, 1, seed=1), _batch()
    teacher = teacher.double()
    top = teacher_topk(teacher, batch, 6)
    kw = dict(temperature=2.0, alpha=0.5, topk_tail=tail)
    live = _loss_and_grads(student, lambda: causal_lm_kd_loss(student, teacher, batch, topk=6, chunk_size=5, **kw))
    cached = _loss_and_grads(student, lambda: causal_lm_kd_loss(student, top, batch, **kw))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    eager = _loss_and_grads(student, lambda: pycompress.kd_loss(student(**inputs).logits, top, shifted_targets(batch),
                                                                reduction="mean", **kw))
    _assert_same(live, eager, rtol=1e-9, atol=1e-11)
    _assert_same(cached, eager, rtol=1e-9, atol=1e-11)


def test_step_runs_under_torch_compile():
    student, teacher, batch = _llama(16, 1, seed=0, tie=True), _llama(24, 1, seed=1).eval(), _batch()
    step = lambda: causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5)  # noqa: E731
    compiled = torch.compile(step, backend="aot_eager")
    _assert_same(_loss_and_grads(student, compiled), _loss_and_grads(student, step), rtol=1e-5, atol=1e-6)


def test_distillation_trainer_runs_two_steps(tmp_path):
    """Two steps on one batch of two rows: the first logged loss is the helper's on the initial student."""
    student, teacher = _llama(16, 1, seed=0), _llama(24, 1, seed=1).eval()
    batch = {k: v[:2] for k, v in _batch().items()}
    first = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5).item()
    before = student.lm_head.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                  temperature=2.0, alpha=0.5)
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    assert losses[0] == pytest.approx(first, rel=1e-3)
    assert losses[1] < losses[0]
    assert not torch.equal(student.lm_head.weight.detach(), before)


def _word_tokenizer():
    """A word-level tokenizer over V tokens built in code (no download): TRL's trainers need one for padding."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"t{i}": i for i in range(V - 1)} | {"<pad>": V - 1}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                                pad_token="<pad>", eos_token="t1")


def test_trl_sft_trainer_distils_through_the_fused_loss(tmp_path):
    """TRL's SFTTrainer with only its loss replaced: same logged loss as the helper, and the student learns."""
    trl = pytest.importorskip("trl", reason="the TRL recipe needs trl (pip install -e '.[hf]')")
    datasets = pytest.importorskip("datasets")
    student, teacher = _llama(16, 1, seed=0), _llama(24, 1, seed=1).eval()
    input_ids = torch.randint(0, V - 1, (2, 9), generator=torch.Generator().manual_seed(3))
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids.clone())
    first = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5).item()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = distillation_trainer(trl.SFTTrainer)(
        model=student, teacher_model=teacher, args=args, processing_class=_word_tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"input_ids": input_ids.tolist()}), temperature=2.0, alpha=0.5)
    assert type(trainer).__name__ == "DistillationSFTTrainer" and isinstance(trainer, trl.SFTTrainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert losses[0] == pytest.approx(first, rel=1e-3)
    assert losses[1] < losses[0]


def test_distillation_trainer_is_one_class_per_base():
    assert distillation_trainer(transformers.Trainer) is DistillationTrainer
    with pytest.raises(TypeError, match="base must be"):
        distillation_trainer(torch.nn.Module)


# --- bad input ----------------------------------------------------------------------------------

def test_rejects_a_teacher_with_another_vocabulary():
    student, batch = _llama(16, 1, seed=0), _batch()
    config = transformers.LlamaConfig(vocab_size=V + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="vocabulary"):
        causal_lm_kd_loss(student, transformers.LlamaForCausalLM(config), batch)


def test_rejects_models_whose_logits_are_not_the_head_of_the_hidden_states():
    student, teacher, batch = _llama(16, 1, seed=0), _llama(24, 1, seed=1), _batch()
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_kd_loss(student, teacher, batch)
    with pytest.raises(TypeError, match="causal LM"):
        causal_lm_kd_loss(torch.nn.Linear(3, 3), teacher, batch)


def test_rejects_topk_of_a_precomputed_topk_teacher_and_a_batch_without_input_ids():
    student, teacher, batch = _llama(16, 1, seed=0), _llama(24, 1, seed=1), _batch()
    with pytest.raises(ValueError, match="already"):
        causal_lm_kd_loss(student, teacher_topk(teacher, batch, 3), batch, topk=3)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_kd_loss(student, teacher, {"labels": batch["labels"]})
    with pytest.raises(ValueError, match="k must be"):
        teacher_topk(teacher, batch, V + 1)


def test_import_pycompress_does_not_import_transformers():
    code = "import sys, pycompress, pycompress.integrations.transformers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
