"""Golden values of the routed methods' maths on tiny tensors: top-k gates, router losses, load balancing."""
from __future__ import annotations

import math

import torch

import lorakit
from lorakit.methods import lora_mixer, routing


def test_top_k_gates_golden():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    gates, idx = routing.top_k_gates(logits, 2)
    assert idx.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(gates, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))
    gates, _ = routing.top_k_gates(logits, 2, temperature=0.5)  # logits / T = 6, 4: weights e^2 : 1
    e2 = math.exp(2.0)
    torch.testing.assert_close(gates, torch.tensor([[0.0, e2 / (e2 + 1), 1 / (e2 + 1), 0.0]]))


def test_entropy_golden():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(lora_mixer.entropy(p), torch.tensor([math.log(2.0), 0.0]))


def mixer(**fields):
    fields = {"r": 1, "num_experts": 2, "top_k": 1, "lora_alpha": 1, **fields}
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), lora_mixer.LoRAMixerConfig(target_modules=["0"], **fields))
    return model[0]


def test_mixer_router_loss_golden():
    layer = mixer(balance_coef=1.0, specialization_coef=0.0, reuse_coef=0.0)
    p = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    chosen = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # E · Σ f_e P_e = 2 · (1 · 0.75 + 0 · 0.25)
    torch.testing.assert_close(layer.router_loss(p, chosen), torch.tensor(1.5))
