"""linear, task_arithmetic, cat and svd: the weighted sum of the updates, exact or best rank-k."""
from __future__ import annotations

import pytest
import torch
from merge_helpers import TOYS, assert_close, mixed, toy_state, weighted_sum

from lorakit.merging import combine

WEIGHTS = [0.7, -1.3, 0.4]  # a negative weight subtracts an adapter


@pytest.mark.parametrize("toy", TOYS, ids=lambda t: t.__name__)
def test_cat_is_the_weighted_sum_of_the_updates_at_the_summed_rank(toy):
    states = [toy_state(i, toy=toy, r=r, **cfg) for i, (r, cfg) in enumerate([(4, {}), (2, {"use_rslora": True}), (3, {})])]
    out = combine(states, "cat", WEIGHTS)
    for path in out.modules():
        assert out.module_config(path).r == 9
        assert_close(out.delta(path), weighted_sum(states, WEIGHTS, path, toy), f"cat {path}")


def test_cat_lays_out_the_factors_as_peft():
    states = mixed()
    out = combine(states, "cat", WEIGHTS)
    a = out.tensors["lin1"]["lora_A.weight"]
    for i, (s, w) in enumerate(zip(states, WEIGHTS)):
        lo = sum(t.module_config("lin1").r for t in states[:i])
        sa, sb, scale = s.low_rank("lin1")
        assert torch.equal(out.tensors["lin1"]["lora_B.weight"][:, lo:lo + sa.shape[0]], sb)
        assert_close(a[lo:lo + sa.shape[0]], sa * w * scale)


def test_linear_averages_and_task_arithmetic_sums():
    states = mixed()
    mean = combine(states, "linear", WEIGHTS)
    total = combine(states, "task_arithmetic", WEIGHTS)
    for path in mean.modules():
        expected = weighted_sum(states, WEIGHTS, path)
        assert_close(total.delta(path), expected)
        assert_close(mean.delta(path), expected / sum(WEIGHTS))


def _best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


@pytest.mark.parametrize("name", ["svd", "task_arithmetic", "linear"])
def test_rank_k_is_the_best_rank_k_approximation_of_the_exact_merge(name):
    states = mixed()
    exact = combine(states, name, WEIGHTS)
    cut = combine(states, name, WEIGHTS, rank=3)
    for path in cut.modules():
        assert cut.module_config(path).r == 3
        assert_close(cut.delta(path), _best_rank_k(exact.delta(path), 3), f"{name} {path}")


def test_svd_defaults_to_the_largest_input_rank():
    states = mixed()  # ranks 4 (lin0, lin1), 8 (lin1 only), 2
    out = combine(states, "svd", WEIGHTS)
    assert out.module_config("lin0").r == 4 and out.module_config("lin1").r == 8
    assert out.config.rank_pattern == {"lin0": 4} and out.config.alpha_pattern == {"lin0": 4}
    assert_close(out.delta("lin1"), _best_rank_k(weighted_sum(states, WEIGHTS, "lin1"), 8))


def test_rank_above_the_update_rank_is_exact():
    states = mixed()
    out = combine(states, "svd", WEIGHTS, rank=100)
    for path in out.modules():
        assert out.module_config(path).r <= 12  # min(out, in, Σr) of the toy's layers
        assert_close(out.delta(path), weighted_sum(states, WEIGHTS, path))


def test_untrained_adapters_merge_to_a_valid_zero_adapter():
    zero = toy_state(1, scale=0.0)  # B = 0: every update is zero
    for name in ("cat", "svd", "ties", "knots", "lego"):
        out = combine([zero, zero], name)
        for path in out.modules():
            assert out.module_config(path).r >= 1  # PEFT refuses r = 0
            assert out.delta(path).abs().max() == 0
