"""FlyLoRA claim tests: A frozen and sparse at density k/r, top-k ranks per token, stable load balancing."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.adapter import NotMergeableError
from lorakit.methods.flylora import FlyLoRAConfig
from lorakit.testing import check_method, perturb_


def layer(r=16, top_k=4, n=64, out=32, **kw):
    torch.manual_seed(0)
    return lorakit.apply(nn.Sequential(nn.Linear(n, out)), FlyLoRAConfig(r=r, top_k=top_k, target_modules=["0"], **kw))[0]


def test_conformance():
    assert len(check_method("flylora")) == 20


def test_a_is_frozen_and_sparse_at_density_k_over_r():
    fly = layer(r=16, top_k=4, n=64)
    a = fly.lora_A.weight.clone()
    assert ((a != 0).sum(dim=1) == 64 * 4 // 16).all()  # p = n·k/r non-zeros in every row
    assert abs(a[a != 0].std().item() - 1 / 16) < 0.02  # N(0, 1/r²)
    trainable = lorakit.trainable_parameters(fly)
    assert list(trainable) == ["lora_B.weight"]
    fly.train()
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    for _ in range(3):
        fly(torch.randn(8, 64)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(fly.lora_A.weight, a)
    lorakit.core.apply.set_trainable(fly, True)  # what load_peft(is_trainable=True) does
    assert not fly.lora_A.weight.requires_grad


def test_only_top_k_ranks_act_per_token():
    fly = layer(r=16, top_k=4)
    perturb_(fly, scale=0.5)  # noise on B (and on A and d, which fixes them at other values)
    fly.eval()
    x = torch.randn(5, 64)
    z = F.linear(x, fly.lora_A.weight)
    chosen = (z + fly.lora_topk_bias).topk(4, dim=-1).indices
    gate = torch.zeros_like(z).scatter_(-1, chosen, 1.0)
    expected = fly.base_layer(x) + fly.lora_B(z * gate) * fly.config.scaling
    torch.testing.assert_close(fly(x), expected)
    fly(x[:1]).sum().backward()  # one token: B learns in the chosen columns only
    active = (fly.lora_B.weight.grad.abs().sum(dim=0) > 0).nonzero().flatten()
    assert sorted(active.tolist()) == sorted(chosen[0].tolist())


def test_all_ranks_active_is_lora_with_the_same_factors():
    fly = layer(r=8, top_k=8)
    perturb_(fly, scale=0.5)
    fly.eval()
    x = torch.randn(4, 64)
    w = fly.base_layer.weight + fly.config.scaling * fly.lora_B.weight @ fly.lora_A.weight
    torch.testing.assert_close(fly(x), F.linear(x, w, fly.base_layer.bias), atol=1e-5, rtol=1e-5)


def test_top_k_below_r_is_input_dependent_so_nothing_treats_it_as_a_fixed_update():
    """The fork's all-ranks merge differs from the forward pass; lorakit declares no capability and refuses."""
    fly = layer(r=16, top_k=4)
    perturb_(fly, scale=0.5)
    fly.eval()
    x = torch.eye(64)[:8]  # one feature per token: different ranks win per token
    w = fly.base_layer.weight + fly.config.scaling * fly.lora_B.weight @ fly.lora_A.weight
    assert (fly(x) - F.linear(x, w, fly.base_layer.bias)).abs().max() > 1e-3
    assert not fly.capabilities.names()
    with pytest.raises(NotMergeableError, match="flylora.*top-4 of 16"):
        type(fly).delta(dict(fly.adapter_tensors()), fly.config, fly.base_layer.weight)


def test_bias_moves_by_the_mean_count_rule_in_training_only():
    fly = layer(r=16, top_k=4, bias_u=0.01)
    x = torch.randn(32, 64)
    fly.eval()
    fly(x)
    assert torch.count_nonzero(fly.lora_topk_bias) == 0
    chosen = fly.route(F.linear(x, fly.lora_A.weight))
    counts = torch.bincount(chosen.flatten(), minlength=16).float()
    fly.train()
    fly(x)
    torch.testing.assert_close(fly.lora_topk_bias, 0.01 * torch.sign(counts.mean() - counts))


def imbalance(counts):
    return (counts.std() / counts.mean()).item()


def balance_run(key, u=0.01, steps=1000, seed=0):
    """Route skewed inputs through a FlyLoRA A with bias d updated by the mean-count rule under ``key``."""
    fly = layer(r=16, top_k=4)
    a = fly.lora_A.weight
    offset = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 2
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.zeros(16)

    def counts(n):
        z = (torch.randn(n, 64, generator=g) + offset) @ a.T
        return torch.bincount(key(z, d).topk(4, dim=-1).indices.flatten(), minlength=16).float()

    before = imbalance(counts(2048))
    for _ in range(steps):
        c = counts(64)
        d += u * torch.sign(c.mean() - c)
    return before, imbalance(counts(2048)), d.abs().max().item()


def test_balancing_evens_out_the_ranks_for_both_offered_keys():
    for key in (lambda z, d: z + d, lambda z, d: z.abs() + d):  # route_by "signed" and "magnitude"
        before, after, largest_bias = balance_run(key)
        assert after < before / 4 and largest_bias < 5, (before, after, largest_bias)


def test_the_adapter_applies_the_balancing_it_was_checked_with():
    for route_by in ("signed", "magnitude"):
        fly = layer(r=16, top_k=4, bias_u=0.02, route_by=route_by)
        fly.train()
        offset = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2
        probe = torch.randn(2048, 64, generator=torch.Generator().manual_seed(1)) + offset
        counts = lambda: torch.bincount(fly.route(F.linear(probe, fly.lora_A.weight)).flatten(), minlength=16).float()  # noqa: E731
        before = imbalance(counts())
        with torch.no_grad():
            for i in range(400):
                fly(torch.randn(64, 64, generator=torch.Generator().manual_seed(i + 2)) + offset)
        assert imbalance(counts()) < before / 3, route_by


def test_magnitude_of_biased_key_diverges_which_is_why_it_is_not_offered():
    before, after, largest_bias = balance_run(lambda z, d: (z + d).abs(), seed=1)
    assert largest_bias > 9 and after > before / 2, (before, after, largest_bias)  # |d| grows by u each step
