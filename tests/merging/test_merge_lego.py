"""LoRA-LEGO claims: rank-wise units commute, stacking is summing, clustering merges similar units, reweighting."""
from __future__ import annotations

import math

import pytest
import torch
from merge_helpers import assert_close, mixed

import lorakit
from lorakit.merging import combine


def lora(a: torch.Tensor, b: torch.Tensor, alpha: float | None = None) -> lorakit.AdapterState:
    """A one-module LoRA state with A [r, in] and B [out, r]."""
    r = a.shape[0]
    config = lorakit.LoRAConfig(r=r, lora_alpha=alpha or r, target_modules=["lin"])
    return lorakit.AdapterState(config, {"lin": {"lora_A.weight": a, "lora_B.weight": b}})


def rand_lora(seed: int, r: int, out: int = 6, inp: int = 5, alpha: float = 8.0) -> lorakit.AdapterState:
    g = torch.Generator().manual_seed(seed)
    return lora(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alpha)


def delta(state, path="lin"):
    return state.delta(path)


def test_order_of_ranks_inside_an_input_does_not_matter():
    states = [rand_lora(1, 4), rand_lora(2, 3)]
    perm = torch.tensor([2, 0, 3, 1])
    a, b = states[0].tensors["lin"]["lora_A.weight"], states[0].tensors["lin"]["lora_B.weight"]
    shuffled = [lora(a[perm], b[:, perm], 8.0), states[1]]
    for k in (2, 3, 5):
        assert_close(delta(combine(states, "lego", rank=k)), delta(combine(shuffled, "lego", rank=k)), f"k={k}")


def test_order_of_inputs_does_not_matter():
    states, weights = [rand_lora(1, 4), rand_lora(2, 3), rand_lora(3, 2)], [1.0, 0.5, -2.0]
    ref = delta(combine(states, "lego", weights, rank=4))
    for order in ([2, 0, 1], [1, 2, 0]):
        got = combine([states[i] for i in order], "lego", [weights[i] for i in order], rank=4)
        assert_close(delta(got), ref, f"order {order}")


def test_units_are_blind_to_how_an_input_splits_its_scale_and_signs():
    """(t·b, a/t) and (−b, −a) are the same rank-1 unit: the merge must not see the difference."""
    s1, s2 = rand_lora(1, 4), rand_lora(2, 4)
    a, b = s1.tensors["lin"]["lora_A.weight"], s1.tensors["lin"]["lora_B.weight"]
    t = torch.tensor([3.0, -0.2, 1.5, -7.0])
    rescaled = lora(a / t[:, None], b * t, 8.0)
    assert_close(delta(rescaled), delta(s1))
    assert_close(delta(combine([s1, s2], "lego", rank=3)), delta(combine([rescaled, s2], "lego", rank=3)))


def test_stacking_is_summing():
    """Concatenation-summation equivalence: the stacked adapter is the sum, and LEGO sees the same unit pool."""
    states, weights = [rand_lora(1, 4), rand_lora(2, 3)], [0.7, 1.4]
    stacked = combine(states, "cat", weights)
    assert_close(delta(stacked), weights[0] * delta(states[0]) + weights[1] * delta(states[1]))
    for k in (2, 4, 7):  # r̄ differs (3.5 vs 7), so compare without output reweighting
        pooled = combine(states, "lego", weights, rank=k, output_reweight=False)
        single = combine([stacked], "lego", rank=k, output_reweight=False)
        assert_close(delta(pooled), delta(single), f"k={k}")


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -1.2, 2.0]])
def test_k_equal_to_the_total_rank_without_reweighting_is_cat(weights):
    states = [rand_lora(1, 4), rand_lora(2, 3), rand_lora(3, 2, alpha=2.0)]
    out = combine(states, "lego", weights, rank=9, param_reweight=False, output_reweight=False)
    assert out.module_config("lin").r == 9
    assert_close(delta(out), delta(combine(states, "cat", weights)))


def test_similar_units_merge_and_distinct_units_stay():
    """Two inputs share one direction (up to noise): with k = 3 it becomes one unit; the others are kept."""
    e = torch.eye(6)
    u, v, w = (e[0], e[1]), (e[2], e[3]), (e[4], e[5])
    eps = 1e-3 * torch.ones(6)
    first = lora(torch.stack([u[1], v[1]]), torch.stack([u[0], v[0]], dim=1))
    second = lora(torch.stack([u[1] + eps, w[1]]), torch.stack([u[0], w[0]], dim=1))
    out = combine([first, second], "lego", rank=3, output_reweight=False)
    outer = lambda p: torch.outer(p[0], p[1])  # noqa: E731
    assert_close(delta(out), outer(u) + outer(v) + outer(w), atol=2e-3)


def test_parameter_reweighting_undoes_the_norm_decay_of_averaging():
    e = torch.eye(2)
    states = [lora(e[:1], e[:, :1]), lora(e[1:], e[:, 1:])]  # units e1 e1ᵀ and e2 e2ᵀ, at right angles
    plain = combine(states, "lego", rank=1, param_reweight=False, output_reweight=False)
    assert_close(delta(plain), torch.full((2, 2), 0.25))  # centroid halves of norm 1/√2 each
    reweighted = combine(states, "lego", rank=1, output_reweight=False)
    assert_close(delta(reweighted), torch.full((2, 2), 0.5))  # halves back to norm 1


def test_output_reweighting_is_sqrt_of_mean_rank_over_k():
    e = torch.eye(2)
    states = [lora(e[:1], e[:, :1]), lora(e[1:], e[:, 1:])]
    out = combine(states, "lego", rank=2)  # every unit its own cluster: r̄ = 1, k = 2
    assert_close(delta(out), torch.eye(2) / math.sqrt(2))


def test_identical_inputs_merge_to_the_input():
    s = rand_lora(4, 4)
    assert_close(delta(combine([s, s, s], "lego")), delta(s))


def test_heterogeneous_ranks_and_targets():
    states = mixed()  # toy states with ranks 4/8/2 and targets {lin0, lin1}, {lin1}, {lin0, lin1}
    out = combine(states, "lego", rank=3)
    assert {p: out.module_config(p).r for p in out.modules()} == {"lin0": 3, "lin1": 3}
    default = combine(states, "lego")
    assert {p: default.module_config(p).r for p in default.modules()} == {"lin0": 4, "lin1": 8}
