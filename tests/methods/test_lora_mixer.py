"""LoRA-Mixer claims: routed LoRA experts with hard-soft top-k routing, trained jointly or as frozen adapters loaded
from files with the router alone; the specialisation balance loss balances the load and sharpens the routing."""
from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.methods import lora_mixer, routing
from lorakit.testing import ToyLinear, check_method, perturb_

from routing_tasks import TokenModel, base_model, batch, mse, stream, teachers, train


def test_conformance():
    assert any(c.endswith("merge refused") for c in check_method("lora_mixer"))
    config = lora_mixer.LoRAMixerConfig(r=2, num_experts=3, top_k=1, straight_through=False, target_modules=ToyLinear.targets)
    assert check_method("lora_mixer", config=config, toys=[ToyLinear])


def mixer_layer(**fields) -> lora_mixer.LoRAMixerLinear:
    torch.manual_seed(0)
    fields = {"r": 2, "num_experts": 4, "top_k": 2, "lora_alpha": 4, **fields}
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(12, 10)), lora_mixer.LoRAMixerConfig(target_modules=["0"], **fields))
    perturb_(model, 0.3, 1)
    return model[0]


def test_hard_top_k_with_soft_weights():
    layer = mixer_layer()
    layer.eval()
    x = torch.randn(5, 6, 12)
    with torch.no_grad():
        layer(x)
        p = torch.softmax(layer.lora_router(x), -1)
    gates = layer.last_gates
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 6))
    top = p.topk(2, dim=-1)
    torch.testing.assert_close(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))


@pytest.mark.parametrize("straight_through", [True, False])
def test_unselected_experts_learn_only_through_the_soft_path(straight_through):
    layer = mixer_layer(top_k=1, straight_through=straight_through, balance_coef=0.0, specialization_coef=0.0, reuse_coef=0.0)
    layer.train()
    x = torch.randn(1, 12)
    layer(x).pow(2).sum().backward()
    chosen = layer.last_gates[0].argmax()
    grad = layer.lora_router.weight.grad.abs().sum(-1)
    # top-1 renormalises the chosen weight to exactly 1: only the soft path tells the router about the others
    if straight_through:
        assert (grad > 0).all()
    else:
        assert torch.equal(grad, torch.zeros(4)), f"chosen expert {chosen.item()}: {grad}"


def test_router_loss_terms():
    layer = mixer_layer(top_k=1, balance_coef=1.0, specialization_coef=0.0, reuse_coef=0.0)
    e = layer.num_experts
    uniform = torch.full((8, e), 1 / e)
    chosen = torch.zeros(8, e)
    chosen[torch.arange(8), torch.arange(8) % e] = 1.0  # each expert gets a quarter of the slots
    assert layer.router_loss(uniform, chosen).item() == pytest.approx(1.0)  # E·Σ f·P = 1 when balanced
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1.0
    assert layer.router_loss(collapsed, collapsed).item() == pytest.approx(e)  # its maximum
    layer = mixer_layer(top_k=1, balance_coef=0.0, specialization_coef=1.0, reuse_coef=1.0)
    # specialisation counts per-token entropy, reuse rewards a spread marginal: one-hot tokens spread evenly score -log E
    assert layer.router_loss(chosen, chosen).item() == pytest.approx(-math.log(e), abs=1e-5)


def router_statistics(layer, x) -> tuple[float, float]:
    """(max expert load / mean load, mean per-token entropy) of the router on ``x``."""
    layer.eval()
    with torch.no_grad():
        layer(x)
        p = torch.softmax(layer.lora_router(x), -1)
    load = (layer.last_gates > 0).float().reshape(-1, layer.num_experts).mean(0)
    return (load.max() / load.mean()).item(), lora_mixer.entropy(p).mean().item()


def test_balance_loss_spreads_the_load_and_specialisation_sharpens_it(seed=0):
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(seed)) + 1.0
    results = {}
    for name, coefs in {"balance": (1.0, 0.0, 0.0), "specialise": (0.0, 1.0, 0.0)}.items():
        layer = mixer_layer(top_k=1, balance_coef=coefs[0], specialization_coef=coefs[1], reuse_coef=coefs[2])
        with torch.no_grad():
            layer.lora_router.weight[0] += 0.3  # with inputs around +1, most tokens go to expert 0
        before = router_statistics(layer, x)
        opt = torch.optim.Adam([layer.lora_router.weight], lr=0.05)
        layer.train()
        for _ in range(100):
            layer(x)
            opt.zero_grad()
            layer.aux_loss.backward()
            opt.step()
        results[name] = (before, router_statistics(layer, x))
    (imb0, _), (imb1, _) = results["balance"]
    (_, ent0), (_, ent1) = results["specialise"]
    assert imb0 > 2.0 and imb1 < 1.2, results
    assert ent1 < 0.5 * ent0, results


def test_frozen_adapters_from_files_route_a_mixed_stream(tmp_path):
    # regime (ii), the card's CPU check: 3 frozen task LoRAs, the router trained on the task loss and the SBL
    # alone (no task labels); > 90% correct expert choice on a held-out mixed stream, loss near the oracle (0)
    experts = teachers(3, scale=0.2)
    dirs = [lorakit.save_state(s, tmp_path / f"task{i}") for i, s in enumerate(experts)]
    model = lora_mixer.from_adapters(base_model(), dirs, top_k=2)
    assert sorted(lorakit.trainable_parameters(model)) == ["out.lora_router.weight", "proj.lora_router.weight"]
    train(model, stream(256, 8, 3, experts, seed=1, mixed=True), steps=300, lr=1e-2)
    held_out = stream(128, 8, 3, experts, seed=3, mixed=True)
    data = batch(held_out)
    with torch.no_grad():
        model(data["input_ids"])
    for path, layer in routing.routed_layers(model).items():
        accuracy = (layer.last_gates.argmax(-1) == data["route_labels"]).float().mean().item()
        assert accuracy > 0.9, f"{path}: {accuracy:.3f}"
    assert mse(model, held_out) < 0.1 * mse(base_model(), held_out)


def test_joint_training_of_experts_and_router():
    # regime (i): experts start as PEFT LoRAs (B = 0) and train with the router on a three-task mixture
    experts = teachers(3, scale=0.2)
    data, held_out = stream(256, 8, 3, experts, seed=1), stream(128, 8, 3, experts, seed=3)
    model = lorakit.apply(base_model(), lora_mixer.LoRAMixerConfig(r=4, num_experts=3, lora_alpha=8, target_modules=TokenModel.targets))
    start = lorakit.AdapterState.from_model(model).tensors["proj"]
    assert {"proj.lora_A.weight", "proj.lora_B.weight", "proj.lora_router.weight"} <= set(lorakit.trainable_parameters(model))
    train(model, data, steps=200, lr=1e-2)
    end = lorakit.AdapterState.from_model(model).tensors["proj"]
    assert all(not torch.equal(start[k], end[k]) for k in start)
    assert mse(model, held_out) < 0.1 * mse(base_model(), held_out)
