"""Trans-LoRA end to end on tiny encoders: filter, distillation, errors, and PEFT compatibility."""
from __future__ import annotations

import random

import pytest
import torch

from lorakit import save_peft, zoo
from lorakit.transfer import (NGramGenerator, SoftLabelled, TransLoRAConfig, distill, judge, kl_to_teacher,
                              teacher_outputs, trans_lora)
from lorakit.transfer.generators import words

from transfer_helpers import make_teacher, sentences

SMALL = dict(candidates=60, num_synthetic=40, min_synthetic=8, epochs=6, lr=5e-3, batch_size=8, max_length=32,
             progress=False)


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_transfer_across_architectures_distils_and_saves_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    teacher, ttok = make_teacher("tiny-bert")
    student, stok = zoo.load("tiny-llama", num_labels=3, seed=1)
    seeds = [r["text"] for r in sentences(5)]
    config = TransLoRAConfig(target_modules=["q_proj", "v_proj"], **SMALL)
    record = trans_lora(teacher, ttok, student, stok, seeds, NGramGenerator(), config)
    assert record["candidates"] == 60 and record["passed_filter"] == 30  # keep_fraction 0.5
    assert record["distilled_on"] == 30 + 5
    assert record["kl_after"] < 0.5 * record["kl_before"]
    assert record["generator"].startswith("ngram: word trigram over the seeds only")
    out = save_peft(student, tmp_path / "adapter")
    fresh, _ = zoo.load("tiny-llama", num_labels=3, seed=1)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    texts = ["the crew was great", "the flight was late"]
    torch.testing.assert_close(_logits(loaded, stok, texts), _logits(student, stok, texts), rtol=1e-4, atol=1e-5)


def test_distillation_moves_the_student_towards_the_teacher_on_unseen_inputs():
    teacher, tok = make_teacher("tiny-bert")
    student, _ = zoo.load("tiny-bert", num_labels=3, seed=5)
    from lorakit import apply
    from lorakit.jobs import method_config

    apply(student, method_config("lora", 4, 8, 0.0, ["query", "value"], "classification"))
    train, held = [r["text"] for r in sentences(64, seed=1)], [r["text"] for r in sentences(32, seed=2)]
    data, held_data = (SoftLabelled(t, teacher_outputs(teacher, tok, t)[0], tok) for t in (train, held))
    before = kl_to_teacher(student, held_data)
    distill(student, data, lr=5e-3, epochs=6, batch_size=8, progress=False)
    assert kl_to_teacher(student, held_data) < 0.5 * before


def test_the_filter_removes_off_distribution_inputs():
    teacher, tok = make_teacher("tiny-bert")
    rng = random.Random(0)
    garbage = ["".join(rng.choice("0123456789#$%&*+=<>|~^") for _ in range(rng.randint(10, 40))) for _ in range(30)]
    good = [r["text"] for r in sentences(30, seed=3)]
    _, real = teacher_outputs(teacher, tok, [r["text"] for r in sentences(5)])
    _, cand = teacher_outputs(teacher, tok, good + garbage)
    verdict = judge(real, cand)
    assert verdict.keep.sum() == 30
    assert verdict.keep[30:].float().mean() <= 0.1  # garbage mostly removed
    assert verdict.keep[:30].float().mean() >= 0.9
    # the paper's absolute rule is available too, and is stricter with five real examples
    assert judge(real, cand, threshold=0.5).keep.sum() <= 30


class Mixed:
    """Proposes 30 in-domain sentences and 30 strings of symbols."""

    def describe(self):
        return "mixed"

    def propose(self, seeds, n, seed=0):
        rng = random.Random(seed)
        garbage = ["".join(rng.choice("0123456789#$%&*+=<>|~^") for _ in range(rng.randint(10, 40)))
                   for _ in range(30)]
        return [r["text"] for r in sentences(30, seed=3)] + garbage


def test_the_transfer_distils_on_what_the_filter_passes():
    teacher, ttok = make_teacher("tiny-bert")
    student, stok = zoo.load("tiny-bert", num_labels=3, seed=1)
    record = trans_lora(teacher, ttok, student, stok, [r["text"] for r in sentences(5)], Mixed(),
                        TransLoRAConfig(**SMALL))
    kept = record["synthetic_inputs"]
    assert len(kept) == 30 and record["distilled_on"] == 35
    assert sum(not t.startswith("the flight") for t in kept) <= 3


def test_without_the_filter_everything_is_distilled_on():
    teacher, ttok = make_teacher("tiny-bert")
    student, stok = zoo.load("tiny-bert", num_labels=3, seed=1)
    record = trans_lora(teacher, ttok, student, stok, [r["text"] for r in sentences(5)], NGramGenerator(),
                        TransLoRAConfig(filter=False, **SMALL))
    assert record["passed_filter"] == record["candidates"] == 60 and record["mean_p_real"] is None


def test_a_head_of_another_size_is_refused_before_any_work():
    teacher, ttok = make_teacher("tiny-bert", num_labels=3)
    student, stok = zoo.load("tiny-bert", num_labels=4)

    class Exploding:
        def propose(self, *a, **k):
            raise AssertionError("the generator ran before the check")

    with pytest.raises(ValueError, match="predicts 3 classes, the target model 4"):
        trans_lora(teacher, ttok, student, stok, ["a b", "c d"], Exploding())


def test_a_filter_that_keeps_too_little_is_an_error_not_a_small_transfer():
    teacher, ttok = make_teacher("tiny-bert")
    student, stok = zoo.load("tiny-bert", num_labels=3)
    config = TransLoRAConfig(**{**SMALL, "min_synthetic": 50})
    with pytest.raises(ValueError, match="kept 30 of 60 .* fewer than min_synthetic=50"):
        trans_lora(teacher, ttok, student, stok, [r["text"] for r in sentences(5)], NGramGenerator(), config)


def test_the_ngram_generator_recombines_only_seed_words_without_background():
    seeds = [r["text"] for r in sentences(5)]
    out = NGramGenerator().propose(seeds, 50, seed=3)
    vocab = {w for s in seeds for w in words(s)}
    assert out and len(set(out)) == len(out) and not set(out) & set(seeds)
    assert all(set(words(t)) <= vocab for t in out)
    assert out == NGramGenerator().propose(seeds, 50, seed=3)
    mixed = NGramGenerator(["zebras gallop over purple hills"] * 50, seed_weight=1).propose(seeds, 50, seed=3)
    assert any("zebras" in t or "purple" in t for t in mixed)


def test_the_lm_generator_proposes_distinct_new_lines():
    from lorakit.transfer import LMGenerator

    lm, tok = zoo.load("tiny-llama", task="causal_lm")
    gen = LMGenerator(lm, tok, max_new_tokens=12, batch_size=4, name="tiny-llama")
    seeds = [r["text"] for r in sentences(5)]
    out = gen.propose(seeds, 6, seed=0)
    assert 0 < len(out) <= 6 and len(set(out)) == len(out) and not set(out) & set(seeds)
    assert all("\n" not in t for t in out)
    assert out == gen.propose(seeds, 6, seed=0)
    assert gen.describe().startswith("lm: tiny-llama")


def test_a_causal_lm_adapter_is_distilled_on_the_teachers_completions(tmp_path):
    peft = pytest.importorskip("peft")
    from lorakit import apply
    from lorakit.jobs import method_config
    from lorakit.transfer.causal import complete

    teacher, tok = zoo.load("tiny-llama", task="causal_lm")
    torch.manual_seed(0)
    apply(teacher, method_config("lora", 4, 8, 0.0, ["q_proj", "v_proj"], "causal_lm", base_model="tiny-llama"))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    student, stok = zoo.load("tiny-gpt2", task="causal_lm", seed=2)
    seeds = [f"the flight number {i} was" for i in range(5)]
    config = TransLoRAConfig(target_modules=["c_attn"], max_new_tokens=8, **{**SMALL, "epochs": 10, "lr": 3e-2})
    record = trans_lora(teacher, tok, student, stok, seeds, NGramGenerator(), config)
    assert record["kind"] == "causal_lm" and record["passed_filter"] == record["candidates"] // 2
    assert record["lm_loss_after"] < record["lm_loss_before"] - 0.4  # nats per completion token
    prompts = ["the flight number 3 was", "the flight number 1 was"]
    assert complete(teacher, tok, prompts, 8) != complete(zoo.load("tiny-gpt2", task="causal_lm", seed=2)[0], stok,
                                                          prompts, 8)
    out = save_peft(student, tmp_path / "adapter")
    fresh, _ = zoo.load("tiny-gpt2", task="causal_lm", seed=2)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    torch.testing.assert_close(_logits(loaded, stok, prompts), _logits(student, stok, prompts), rtol=1e-4, atol=1e-5)


def test_a_causal_adapter_needs_a_language_model_as_target():
    from lorakit import apply
    from lorakit.jobs import method_config

    teacher, tok = zoo.load("tiny-llama", task="causal_lm")
    apply(teacher, method_config("lora", 4, 8, 0.0, ["q_proj"], "causal_lm"))
    student, stok = zoo.load("tiny-bert", num_labels=3)
    with pytest.raises(ValueError, match="causal-LM adapter; the target BertForSequenceClassification has no"):
        trans_lora(teacher, tok, student, stok, ["a b", "c d"], NGramGenerator())
