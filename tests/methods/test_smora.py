"""SMoRA claims: a multi-LoRA MoE is one LoRA with block-wise rank activation; each rank an expert, k of r active
per token, balanced without an auxiliary loss; better multi-task loss than a LoRA with as many active ranks."""
from __future__ import annotations

import torch

import lorakit
from lorakit.methods import lora_mixer, routing, smora
from lorakit.testing import ToyLinear, check_method, perturb_

from routing_tasks import TokenModel, base_model, mse, stream, teachers, train


def test_conformance():
    assert any(c.endswith("merge refused") for c in check_method("smora"))
    assert check_method("smora", config=smora.SMoRAConfig(r=8, top_k=3, target_modules=ToyLinear.targets), toys=[ToyLinear])


def smora_layer(r=16, k=4, **fields) -> smora.SMoRALinear:
    torch.manual_seed(0)
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(12, 10)), smora.SMoRAConfig(
        r=r, top_k=k, lora_alpha=2 * r, target_modules=["0"], **fields))
    perturb_(model, 0.3, 1)
    return model[0]


def test_k_of_r_ranks_active_with_renormalised_scores():
    layer = smora_layer(r=16, k=4)
    x = torch.randn(6, 9, 12)
    with torch.no_grad():
        layer.lora_router_bias.copy_(torch.linspace(-0.5, 0.5, 16))
        layer.eval()
        layer(x)
    gates = layer.last_gates
    assert ((gates > 0).sum(-1) == 4).all()
    torch.testing.assert_close(gates.sum(-1), torch.full((6, 9), 4.0))
    # the bias chooses the ranks but never enters the gate values: kept softmax scores renormalised to mean 1
    z = layer.lora_router(x)
    chosen = (z + layer.lora_router_bias).topk(4, dim=-1).indices
    p = torch.softmax(z, -1).gather(-1, chosen)
    torch.testing.assert_close(gates.gather(-1, chosen), 4 * p / p.sum(-1, keepdim=True))


def test_all_ranks_with_uniform_scores_is_plain_lora():
    layer = smora_layer(r=8, k=8)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
    lora = lorakit.apply(torch.nn.Sequential(layer.base_layer), lorakit.LoRAConfig(r=8, lora_alpha=16, target_modules=["0"]))[0]
    with torch.no_grad():
        lora.lora_A.weight.copy_(layer.lora_A.weight)
        lora.lora_B.weight.copy_(layer.lora_B.weight)
        x = torch.randn(5, 12)
        torch.testing.assert_close(layer(x), lora(x))


def test_multi_lora_moe_is_block_activation_of_one_lora():
    # the paper's unified view: E experts of rank b with token gates = one LoRA of rank E·b whose blocks are
    # switched on by the gates; check the stacked layer against the experts' sum computed one by one
    torch.manual_seed(0)
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(12, 10)), lora_mixer.LoRAMixerConfig(
        r=3, num_experts=4, top_k=2, lora_alpha=6, target_modules=["0"]))
    perturb_(model, 0.3, 2)
    layer = model[0]
    x = torch.randn(7, 12)
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
        g = layer.last_gates
        a, b = layer.lora_A.weight, layer.lora_B.weight
        want = sum(g[:, e, None] * 2.0 * (x @ a[3 * e : 3 * e + 3].T @ b[:, 3 * e : 3 * e + 3].T) for e in range(4))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def imbalance(layer, x) -> float:
    layer.eval()
    with torch.no_grad():
        layer(x)
    load = layer.rank_load()
    return (load.max() / load.mean()).item()


def test_bias_balances_the_rank_load_without_an_aux_loss():
    x = torch.randn(64, 8, 12)
    skewed = {}
    for u in (0.0, 0.02):
        layer = smora_layer(r=16, k=2, bias_u=u)
        with torch.no_grad():
            layer.lora_router.weight[:3] += 0.3 * layer.lora_router.weight[:3].sign()  # three ranks dominate
        start = imbalance(layer, x)
        layer.train()
        for _ in range(200):
            with torch.no_grad():
                layer(torch.randn(16, 8, 12))
        assert layer.aux_loss is None
        skewed[u] = (start, imbalance(layer, x))
    assert skewed[0.0][1] == skewed[0.0][0] > 2.0  # no bias updates: the skew stays
    assert skewed[0.02][1] < 1.6  # mean load is 1; the balanced router keeps every rank near it


def test_padding_is_left_out_of_the_load():
    layer = smora_layer(r=8, k=2, bias_u=1.0)
    layer.train()
    before = layer.lora_router_bias.clone()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad(), routing.route_context(torch.nn.Sequential(layer), mask):
        layer(torch.randn(2, 5, 12))
    assert torch.equal(layer.lora_router_bias, before)  # no real token: nothing to balance
    mask[0, :2] = True
    with torch.no_grad(), routing.route_context(torch.nn.Sequential(layer), mask):
        layer(torch.randn(2, 5, 12))
    load = (layer.last_gates[0, :2] > 0).float().sum(0)  # the two real tokens only
    torch.testing.assert_close(layer.lora_router_bias, before + torch.sign(load.mean() - load))


def test_multi_task_beats_lora_with_the_same_active_ranks():
    # the card's CPU check, first half: SMoRA r=64, k=8 against LoRA r=8 on a mixture of 8 tasks
    experts = teachers(8, scale=0.2)
    data, test = stream(512, 8, 8, experts, seed=1), stream(256, 8, 8, experts, seed=3)
    losses = {}
    for name, config in {
        "lora": lorakit.LoRAConfig(r=8, lora_alpha=16, target_modules=TokenModel.targets),
        "smora": smora.SMoRAConfig(r=64, top_k=8, lora_alpha=128, target_modules=TokenModel.targets),
    }.items():
        torch.manual_seed(0)
        model = lorakit.apply(base_model(), config)
        train(model, data, steps=200, lr=1e-2)
        losses[name] = mse(model, test)
    assert losses["smora"] < 0.2 * losses["lora"], losses
