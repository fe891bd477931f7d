"""LoRAPrune: the schedule, the LoRA-only importance, masks equal to slicing, and a model transformers loads."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.compress.loraprune import LoRAPrune, LoRAPruneConfig, magnitude_prune, sparsity_at, spearman
from lorakit.compress.structure import blocks
from lorakit.train import fit

from compress_helpers import lm_data, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _trained_pruner(metric="lora", ratio=0.5, steps=12, seed=0):
    model = lorakit.apply(tiny_llama(seed), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL))
    pruner = LoRAPrune(model, LoRAPruneConfig(ratio=ratio, metric=metric, prune_freq=2), total_steps=steps)
    fit(model, lm_data(), lr=1e-2, batch_size=8, max_steps=steps, callbacks=[pruner], progress=False, warmup_ratio=0.0)
    return model, pruner


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, 0.0])
def test_sparsity_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"sparsity must lie in \(0, 1\)"):
        LoRAPruneConfig(ratio=bad)
    with pytest.raises(ValueError, match=r"sparsity must lie in \(0, 1\)"):
        magnitude_prune(tiny_llama(), bad)


def test_the_schedule_is_the_cubic_ramp_between_warmup_and_cooldown():
    cfg = LoRAPruneConfig(ratio=0.5, warmup=0.1, cooldown=0.1)
    assert sparsity_at(10, 100, cfg) == 0 and sparsity_at(90, 100, cfg) == 0.5 and sparsity_at(100, 100, cfg) == 0.5
    assert sparsity_at(50, 100, cfg) == pytest.approx(0.5 - 0.5 * 0.5 ** 3)  # halfway: 1 - (1/2)^3 of the way
    values = [sparsity_at(s, 100, cfg) for s in range(101)]
    assert values == sorted(values)


def test_lora_scores_are_the_papers_estimate_from_lora_gradients_only():
    model, pruner = _trained_pruner(steps=4)
    path = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(path)
    batch = {k: torch.stack([d[k] for d in lm_data(8)]) for k in ("input_ids", "labels")}
    model.zero_grad()
    model(**batch).loss.backward()
    a, b, ga, gb = layer.lora_A.weight, layer.lora_B.weight, layer.lora_A.weight.grad, layer.lora_B.weight.grad
    w = layer.base_layer.weight + layer.scaling * b @ a
    expected = ((gb @ a + b @ ga - gb @ ga) * w).abs().sum(1)
    torch.testing.assert_close(pruner.row_scores(path), expected.detach(), rtol=1e-5, atol=1e-8)
    assert all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize("metric", ["lora", "grad", "magnitude"])
def test_row_chunked_scores_equal_the_whole_weight_formula(monkeypatch, metric):
    import lorakit.compress.loraprune as module

    monkeypatch.setattr(module, "CHUNK", 7)  # chunks that do not divide the 128 rows
    model, pruner = _trained_pruner(metric=metric, steps=4)
    path = "model.layers.1.mlp.gate_proj"
    layer = model.get_submodule(path)
    batch = {k: torch.stack([d[k] for d in lm_data(8)]) for k in ("input_ids", "labels")}
    model.zero_grad()
    model(**batch).loss.backward()
    with torch.no_grad():
        w = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        if metric == "magnitude":
            expected = w.abs().sum(1)
        else:
            a, b, ga, gb = layer.lora_A.weight, layer.lora_B.weight, layer.lora_A.weight.grad, layer.lora_B.weight.grad
            g = pruner.grads[path]["W"] if metric == "grad" else gb @ a + b @ ga - gb @ ga
            expected = (g * w).abs().sum(1)
    torch.testing.assert_close(pruner.row_scores(path), expected, rtol=1e-5, atol=1e-8)


def test_masked_training_model_equals_the_sliced_merged_model_and_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model, pruner = _trained_pruner()
    assert pruner.sparsity() == {"groups": 0.5, "channels": 0.5}
    ids = torch.stack([d["input_ids"] for d in lm_data(4, seed=5)])
    with torch.no_grad():
        masked = model(ids).logits
    full_size = sum(p.numel() for p in tiny_llama().parameters())
    small = pruner.finalize()
    assert not lorakit.adapters(small)
    assert small.model.layers[0].mlp.up_proj.weight.shape == (64, 64)  # 128 channels -> 64
    assert small.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)  # 2 kv heads of 16 -> 1
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked, atol=1e-5, rtol=1e-5)
    small.save_pretrained(tmp_path / "pruned")
    tiny_llama().save_pretrained(tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # no lorakit involved
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked, atol=1e-5, rtol=1e-5)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")
    assert size(tmp_path / "pruned") < 0.85 * size(tmp_path / "full")
    assert sum(p.numel() for p in loaded.parameters()) < full_size


def test_lora_guided_channel_scores_rank_like_full_gradient_scores():
    """The card's CPU check, on a random-weight model: LoRA-guided scores rank channels like true-gradient scores.

    The card asks for Spearman > 0.7 on a small pretrained model (measured on MiniLM in bench/compression.py);
    here, rank 4 on random weights, the test asks > 0.5 and more than magnitude scores reach.
    """
    model = lorakit.apply(tiny_llama(), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL))
    fit(model, lm_data(), lr=1e-2, batch_size=8, max_steps=10, progress=False, warmup_ratio=0.0)  # B no longer 0
    lora, grad, size = (LoRAPrune(model, LoRAPruneConfig(metric=m), total_steps=10) for m in ("lora", "grad", "magnitude"))
    batch = {k: torch.stack([d[k] for d in lm_data(16, seed=2)]) for k in ("input_ids", "labels")}
    model(**batch).loss.backward()
    for pruner in (lora, grad, size):
        pruner.update_scores()
    rho = [spearman(lora.scores[b.path]["channels"], grad.scores[b.path]["channels"]) for b in lora.blocks]
    rho_size = [spearman(size.scores[b.path]["channels"], grad.scores[b.path]["channels"]) for b in lora.blocks]
    assert min(rho) > 0.5 and sum(rho) > sum(rho_size), (rho, rho_size)


def test_the_lora_metric_needs_lora_on_the_pruned_layers():
    model = lorakit.apply(tiny_llama(), lorakit.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="needs a LoRA adapter on every pruned layer.*gate_proj"):
        LoRAPrune(model, LoRAPruneConfig(), total_steps=10)


def test_magnitude_pruning_keeps_the_largest_rows():
    model = tiny_llama()
    up = model.model.layers[1].mlp.up_proj.weight.detach().abs().sum(1)
    gate = model.model.layers[1].mlp.gate_proj.weight.detach().abs().sum(1)
    score = up / up.norm() + gate / gate.norm()
    kept = score.argsort(descending=True)[:96].sort().values  # 25% of 128 removed
    expected = model.model.layers[1].mlp.up_proj.weight.detach()[kept]
    magnitude_prune(model, 0.25)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, expected)
    assert model.config.intermediate_size == 96 and len(blocks(model)) == 2
