"""ties, magnitude_prune, dare_linear, dare_ties: the papers' steps on small hand-checked task vectors."""
from __future__ import annotations

import pytest
import torch
from merge_helpers import assert_close, mixed, toy_state, update, weighted_sum

from lorakit.merging import MergeError, combine
from lorakit.merging.task_vectors import combine_task_vectors

TAUS = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -2.5, 1.0, 0.1]])


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    # top-50%: τ1 -> [3, 0, 0, 2], τ2 -> [-2, -2.5, 0, 0]; signs of the sums: [+, -, (0: +), +]
    got = combine_task_vectors(TAUS, [1.0, 1.0], "ties", density=0.5)
    assert torch.equal(got, torch.tensor([3.0, -2.5, 0.0, 2.0]))
    full = combine_task_vectors(TAUS, [1.0, 1.0], "ties", density=1.0)  # no trim: position 2 averages 0.5 and 1
    assert torch.equal(full, torch.tensor([3.0, -1.75, 0.75, 1.05]))


def test_ties_frequency_election_counts_signs():
    taus = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert combine_task_vectors(taus, [1, 1, 1], "ties", majority="total").item() == 5.0
    assert combine_task_vectors(taus, [1, 1, 1], "ties", majority="frequency").item() == -1.0


def test_ties_elects_on_weighted_task_vectors():
    """A negative weight makes an adapter vote with its negated update (PEFT elects on unweighted ones)."""
    taus = torch.tensor([[1.0], [2.0]])
    assert combine_task_vectors(taus, [1.0, -1.0], "ties").item() == -2.0


def test_magnitude_prune_trims_then_sums():
    got = combine_task_vectors(TAUS, [1.0, 0.5], "magnitude_prune", density=0.5)
    assert torch.equal(got, torch.tensor([2.0, -1.25, 0.0, 2.0]))


def test_dare_keeps_the_expected_update():
    """DARE's rescaled random drop is unbiased: the mean over many masks approaches the task vector."""
    tau = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([combine_task_vectors(tau, [1.0], "dare_linear", density=0.3, generator=g) for _ in range(1000)])
    kept = (draws != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    assert (draws.mean(0) - tau[0]).abs().mean() < 0.1 * tau.abs().mean()


def test_dare_ties_combines_drop_with_sign_consensus():
    taus = torch.tensor([[2.0, 2.0], [-1.0, 4.0]])
    got = combine_task_vectors(taus, [1.0, 1.0], "dare_ties", density=1.0)
    assert torch.equal(got, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_density_one_is_task_arithmetic_or_its_disjoint_mean(name):
    states, weights = mixed(), [0.6, 0.3, 0.8]
    out = combine(states, name, weights, density=1.0, rank=100)
    for path in out.modules():
        expected = weighted_sum(states, weights, path)
        if name in ("magnitude_prune", "dare_linear"):
            assert_close(out.delta(path), expected, f"{name} {path}")
        else:  # all weights positive: entries agree where updates share a sign
            taus = torch.stack([w * update(s, path) for s, w in zip(states, weights)])
            assert_close(out.delta(path), combine_task_vectors(taus, [1.0] * 3, "ties", density=1.0), f"{name} {path}")


def test_density_out_of_range_is_refused():
    states = mixed()
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\], found 1.5"):
        combine(states, "ties", density=1.5)
    with pytest.raises(MergeError, match="majority must be 'total' or 'frequency'"):
        combine(states, "dare_ties", majority="count")


def test_dare_masks_differ_between_modules_and_seeds():
    state = toy_state(3, r=4)
    twins = [state, state]
    a, b = combine(twins, "dare_linear", seed=0), combine(twins, "dare_linear", seed=1)
    assert not torch.allclose(a.delta("lin1"), b.delta("lin1"))
