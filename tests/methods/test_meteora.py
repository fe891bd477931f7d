"""MeteoRA claims: frozen task LoRAs behind a supervised token-level top-k gate match the individual adapters and
switch between them token by token; experts load from PEFT adapter directories; the gate loss is the official one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.adapter import NotMergeableError
from lorakit.methods import meteora, routing
from lorakit.testing import ToyLinear, check_method

from routing_tasks import TokenModel, base_model, batch, mse, stream, teachers, train


def test_conformance():
    assert any(c.endswith("merge refused") for c in check_method("meteora"))
    config = meteora.MeteoRAConfig(r=3, num_experts=3, top_k=1, temperature=0.5, target_modules=ToyLinear.targets)
    assert check_method("meteora", config=config, toys=[ToyLinear])


def routing_accuracy(model, examples) -> dict[str, float]:
    data = batch(examples)
    model.eval()
    with torch.no_grad():
        model(data["input_ids"])
    return {p: (m.last_gates.argmax(-1) == data["route_labels"]).float().mean().item()
            for p, m in routing.routed_layers(model).items()}


def test_layer_is_the_gated_sum_of_its_experts(tmp_path):
    # experts of different ranks and scalings (rsLoRA too), loaded from PEFT directories
    experts = teachers(2, rank=4, alpha=[8, 3]) + teachers(1, rank=2, seed=7)
    rs = lorakit.apply(base_model(), lorakit.LoRAConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["proj"]))
    lorakit.testing.perturb_(rs, 0.3, 9)
    experts.append(lorakit.AdapterState.from_model(rs))
    dirs = [lorakit.save_state(s, tmp_path / f"e{i}") for i, s in enumerate(experts)]
    model = meteora.from_adapters(base_model(), dirs, top_k=2)
    layer = model.proj
    assert layer.num_experts == 4 and layer.block == 4
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
        gates = layer.last_gates
        want = sum(gates[..., i, None] * (x @ s.delta("proj", layer.base_layer.weight).T) for i, s in enumerate(experts))
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_one_expert_reproduces_its_adapter(tmp_path):
    expert = teachers(1, rank=4, alpha=[3])[0]
    x = torch.randint(0, 64, (4, 6))
    with torch.no_grad():
        alone = expert.load_into(base_model())(x).logits
        embedded = meteora.from_adapters(base_model(), [lorakit.save_state(expert, tmp_path / "e")])(x).logits
    torch.testing.assert_close(embedded, alone, atol=1e-5, rtol=1e-5)


def test_only_the_gate_trains_after_loading(tmp_path):
    experts = teachers(3)
    model = meteora.from_adapters(base_model(), experts)
    trainable = lorakit.trainable_parameters(model)
    assert sorted(trainable) == ["out.moe_gate.weight", "proj.moe_gate.weight"]
    assert sum(p.numel() for p in trainable.values()) == 3 * 16 + 3 * 16  # E·in per layer
    reloaded = lorakit.load_peft(base_model(), lorakit.save_peft(model, tmp_path / "m"), is_trainable=True)
    assert sorted(lorakit.trainable_parameters(reloaded)) == sorted(trainable)  # the experts stay fixed
    before = {k: v.clone() for k, v in lorakit.AdapterState.from_model(model).tensors["proj"].items()}
    train(model, stream(64, 4, 3, experts, seed=1), steps=5, supervise=True)
    after = lorakit.AdapterState.from_model(model).tensors["proj"]
    assert torch.equal(after["lora_A.weight"], before["lora_A.weight"])
    assert torch.equal(after["lora_B.weight"], before["lora_B.weight"])
    assert not torch.equal(after["moe_gate.weight"], before["moe_gate.weight"])


def test_gate_loss_is_the_official_cross_entropy():
    model = meteora.from_adapters(base_model(), teachers(3))
    ids = torch.randint(0, 64, (4, 5))
    task = torch.tensor([0, 2, 1, 2])
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    logits = {}
    hooks = [m.moe_gate.register_forward_hook(lambda mod, i, o, p=p: logits.__setitem__(p, o))
             for p, m in routing.routed_layers(model).items()]
    model.train()
    with routing.route_context(model, mask, task):
        model(ids)
        got = routing.aux_loss(model)
    for h in hooks:
        h.remove()
    keep = mask.bool()
    # official: one cross-entropy over every layer's logits concatenated, times moe_aux_loss_coef = 50
    flat = torch.cat([logits[p][keep] for p in sorted(logits)])
    labels = task[:, None].expand(4, 5)[keep].repeat(len(logits))
    torch.testing.assert_close(got, 50 * F.cross_entropy(flat.float(), labels), atol=1e-4, rtol=1e-5)


def test_gate_learns_per_token_routing_and_matches_the_adapters():
    # the card's CPU check: 4 task LoRAs, gate-only training, >= 95% per-token routing on single-task inputs,
    # and a concatenated two-task prompt routed token by token
    experts = teachers(4, scale=0.2)
    model = meteora.from_adapters(base_model(), experts, top_k=2)
    train(model, stream(256, 8, 4, experts, seed=1), steps=200, supervise=True)
    single = stream(128, 8, 4, experts, seed=2)
    assert min(routing_accuracy(model, single).values()) >= 0.95
    assert mse(model, single) < 0.05 * mse(base_model(), single)  # the individual adapters score 0
    first, second = stream(64, 4, 4, experts, seed=3), stream(64, 4, 4, experts, seed=4)
    composite = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(first, second)]
    assert sum(a["route_labels"][0] != b["route_labels"][0] for a, b in zip(first, second)) > 32
    assert min(routing_accuracy(model, composite).values()) >= 0.95


def test_merge_refused_and_errors_name_the_problem():
    model = meteora.from_adapters(base_model(), teachers(2))
    with pytest.raises(NotMergeableError, match="proj.*input-dependent"):
        lorakit.merge(model)
    assert set(routing.routed_layers(model)) == {"proj", "out"}
    dora = lorakit.apply(base_model(), lorakit.DoRAConfig(r=2, target_modules=TokenModel.targets))
    with pytest.raises(TypeError, match="expert 1 .*'dora'"):
        meteora.from_adapters(base_model(), [teachers(1)[0], lorakit.AdapterState.from_model(dora)])
    with pytest.raises(ValueError, match="top_k"):
        meteora.MeteoRAConfig(num_experts=2, top_k=3)
