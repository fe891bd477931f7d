"""Gradient checkpointing, full and selective: the same gradients as without (dropout on), less activation memory,
the units selective recomputes on BERT- and Llama-style blocks, and clear refusals."""
import pytest
import torch
from strategy_models import data, lora4
from transformers import BertConfig, BertForSequenceClassification

import lorakit
from lorakit.train import TrainConfig, fit
from lorakit.train.checkpointing import enable_gradient_checkpointing, selective_units


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForSequenceClassification(cfg)
    return lorakit.apply(model, lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=["query", "key", "value"],
                                                   task_type="SEQ_CLS"))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (4, 12), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([11]), 0),
                labels=torch.tensor([0, 1, 2, 1]))


def _grads_and_saved(mode):
    model = _bert()
    model.train()
    if mode:
        enable_gradient_checkpointing(model, mode)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**_batch()).loss
    loss.backward()
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(storages.values()) - weights


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing_with_dropout_on(mode):
    plain, plain_saved = _grads_and_saved(None)
    ckpt, ckpt_saved = _grads_and_saved(mode)
    assert plain.keys() == ckpt.keys() and any("lora_A" in n for n in plain)
    for name, grad in plain.items():
        assert grad is not None and ckpt[name] is not None, name
        assert torch.allclose(grad, ckpt[name], rtol=1e-5, atol=1e-7), name
    assert ckpt_saved < 0.7 * plain_saved  # the forward keeps less for the backward


def test_selective_recomputes_attention_core_and_ffn_widening():
    bert = _bert()
    assert selective_units(bert.bert.encoder.layer[0], 16) == ["attention.self", "intermediate"]
    llama = lora4()
    assert selective_units(llama.model.layers[0], llama.config.hidden_size) == ["self_attn"]
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=32, hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert selective_units(gemma.model.layers[0], 16) == ["self_attn"]  # its q/k norms are per head, not blocking


def test_selective_checkpointing_in_fit_trains_the_same_adapter():
    run = TrainConfig(lr=5e-3, batch_size=5, max_steps=3, warmup_steps=0, log_every=1, progress=False, seed=1)
    train = data()[0]
    plain, ckpt = lora4(), lora4()
    a = fit(plain, train, config=run)
    b = fit(ckpt, train, config=run, gradient_checkpointing="selective")
    ours, theirs = lorakit.AdapterState.from_model(ckpt).tensors, lorakit.AdapterState.from_model(plain).tensors
    for path, tensors in theirs.items():
        for key, t in tensors.items():
            assert torch.allclose(t, ours[path][key], atol=1e-6), (path, key)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-6)


def test_unknown_mode_and_models_without_blocks_are_refused():
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be one of \('full', 'selective'\)"):
        TrainConfig(gradient_checkpointing="partial")
    net = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="gradient checkpointing needs a transformers model"):
        enable_gradient_checkpointing(net, "selective")
