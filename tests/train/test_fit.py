"""fit: what it trains, determinism, accumulation, evaluation, metrics file, errors."""

import json
import math

import pytest
import torch
from conftest import tiny_classifier

from lorakit import zoo
from lorakit.data import Task, byte_tokenizer
from lorakit.train import TrainConfig, evaluate, fit

FAST = TrainConfig(lr=1e-2, batch_size=8, epochs=2, log_every=1, progress=False, warmup_ratio=0.0)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_trainable_parameters_change(cls_data):
    model, _ = tiny_classifier()
    before = _params(model)
    result = fit(model, cls_data[0], config=FAST)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and result.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name
    assert result.steps == 2 * math.ceil(len(cls_data[0]) / 8)
    assert [h["step"] for h in result.history] == list(range(1, result.steps + 1))


def test_training_lowers_the_loss(cls_data):
    model, _ = tiny_classifier()
    start = evaluate(model, cls_data[0])["loss"]
    fit(model, cls_data[0], config=FAST, epochs=6, lr=3e-2)
    assert evaluate(model, cls_data[0])["loss"] < start - 0.1


def test_same_seed_same_losses(cls_data):
    runs = []
    for seed in (0, 0, 1):
        model, _ = tiny_classifier()
        runs.append([h["loss"] for h in fit(model, cls_data[0], config=FAST, seed=seed).history])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed picks the data order


def test_accumulation_matches_a_bigger_batch(cls_data):
    train = torch.utils.data.Subset(cls_data[0], range(32))
    train.collate = cls_data[0].collate
    results = []
    for batch_size, accum in ((8, 2), (16, 1)):
        model, _ = tiny_classifier()
        fit(model, train, config=FAST, batch_size=batch_size, grad_accum_steps=accum, max_grad_norm=None)
        results.append({n: p for n, p in model.named_parameters() if p.requires_grad})
    for name, param in results[0].items():
        torch.testing.assert_close(param, results[1][name], rtol=1e-4, atol=1e-5)


def test_eval_metrics_and_metrics_file(cls_data, tmp_path):
    model, _ = tiny_classifier()
    calls = []

    def positives(logits, batch):
        calls.append(len(batch["labels"]))
        return {"predicted_0": (logits.argmax(-1) == 0).float().mean().item()}

    result = fit(model, cls_data[0], cls_data[1], config=FAST, eval_every=3, output_dir=str(tmp_path), metric_fn=positives)
    assert set(result.eval_metrics) == {"loss", "accuracy", "predicted_0"}
    assert sum(calls) % len(cls_data[1]) == 0 and sum(calls) > len(cls_data[1])
    direct = evaluate(model, cls_data[1], batch_size=5)
    assert math.isclose(direct["loss"], result.eval_metrics["loss"], rel_tol=1e-5)
    assert direct["accuracy"] == result.eval_metrics["accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    evaluated = [r["step"] for r in lines if "eval_loss" in r]
    assert evaluated == sorted({*range(3, result.steps + 1, 3), result.steps})
    assert all({"step", "loss", "lr", "elapsed"} <= set(r) for r in lines)


def test_causal_lm_eval_reports_perplexity():
    model, tok = zoo.load("tiny-gpt2", "causal_lm")
    task = Task("causal_lm", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(12)], [], [])
    data = task.encode(tok, max_length=16)["train"]
    metrics = evaluate(model, data, batch_size=4)
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)
    assert 4.0 < metrics["loss"] < 10.0  # about ln(1000) for random weights
    result = fit(model, data, data, config=FAST, epochs=1, batch_size=4)
    assert "eval_perplexity" in result.history[-1] and result.eval_metrics["loss"] < metrics["loss"]


def test_errors(cls_data):
    model, _ = zoo.load("tiny-llama", "seq_cls", num_labels=3)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        fit(model, cls_data[0], config=FAST)
    with pytest.raises(TypeError, match="learning_rate"):
        fit(model, cls_data[0], learning_rate=1.0)
    with pytest.raises(ValueError, match="empty"):
        fit(tiny_classifier()[0], [], config=FAST)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])
    for option in ({"save_every": 2}, {"resume": True}):
        with pytest.raises(ValueError, match="output_dir"):
            fit(tiny_classifier()[0], cls_data[0], config=FAST, **option)


def test_default_collate_for_plain_sequences():
    tok = byte_tokenizer()
    enc = tok(["ab", "cd", "ef", "gh"], return_tensors="pt")
    data = [{"input_ids": ids, "attention_mask": m, "labels": torch.tensor(i % 3)} for i, (ids, m) in
            enumerate(zip(enc["input_ids"], enc["attention_mask"]))]
    model, _ = tiny_classifier()
    result = fit(model, data, config=FAST, batch_size=2)
    assert result.steps == 4 and all(math.isfinite(h["loss"]) for h in result.history)


def test_trains_a_lorakit_adapter(cls_data):
    import lorakit

    model, _ = zoo.load("tiny-llama", "seq_cls", num_labels=3)
    config = lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    lorakit.apply(model, config)
    before = _params(model)
    result = fit(model, cls_data[0], cls_data[1], config=FAST)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in changed) and any("score" in n for n in changed)
    assert not any("base_layer" in n for n in changed)
    assert result.trainable_params == sum(p.numel() for p in lorakit.trainable_parameters(model).values())


def test_loss_fn_replaces_the_training_loss(cls_data):
    model, _ = tiny_classifier()
    seen = []

    def doubled(m, batch):
        seen.append(sorted(batch))
        return 2 * m(**batch).loss

    plain = fit(tiny_classifier()[0], cls_data[0], config=FAST, max_steps=3, max_grad_norm=None).history
    hooked = fit(model, cls_data[0], config=FAST, max_steps=3, max_grad_norm=None, loss_fn=doubled).history
    assert seen and seen[0] == ["attention_mask", "input_ids", "labels"]
    assert math.isclose(hooked[0]["loss"], 2 * plain[0]["loss"], rel_tol=1e-5)
