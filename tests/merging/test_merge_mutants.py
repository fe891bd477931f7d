"""Merge maths pinned where mutation testing found it loose: knobs reach the maths, edge ranks, scale-free cut-offs."""
from __future__ import annotations

import pytest
import torch
from merge_helpers import assert_close, mixed, weighted_sum
from test_merge_lego import lora, rand_lora

from lorakit.merging import MERGERS, MergeError, combine, lego as lego_module
from lorakit.merging.lowrank import truncate
from lorakit.merging.protocol import Part
from lorakit.merging.task_vectors import combine_task_vectors


def parts_of(*specs, inp=5, out=6, seed=0):
    """Parts with the given (rank, scale); rank-0 parts are zero updates."""
    g = torch.Generator().manual_seed(seed)
    return [Part(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), s) for r, s in specs]


def dense(a, b):
    return b.double() @ a.double()


@pytest.mark.parametrize("name", ["knots", "lego"])
def test_no_update_anywhere_merges_to_rank_zero(name):
    fn = MERGERS.get(name).fn
    parts = parts_of((0, 0.0), (0, 0.0))
    a, b = fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(0))
    assert a.shape == (0, 5) and b.shape == (6, 0)


def test_lego_of_untrained_inputs_is_rank_zero():
    """B = 0 everywhere: every unit is dropped, nothing is clustered."""
    parts = [Part(torch.randn(3, 5), torch.zeros(6, 3), 1.0), Part(torch.randn(2, 5), torch.zeros(6, 2), 1.0)]
    a, b = MERGERS.get("lego").fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(0))
    assert a.shape == (0, 5) and b.shape == (6, 0)


def test_knots_of_zero_updates_is_rank_zero():
    parts = [Part(torch.randn(3, 5), torch.zeros(6, 3), 1.0), Part(torch.randn(2, 5), torch.zeros(6, 2), 1.0)]
    a, b = MERGERS.get("knots").fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(0), inner="task_arithmetic")
    assert a.shape[0] == 0 and b.shape[1] == 0


def test_knots_names_the_inner_choices():
    with pytest.raises(MergeError, match=r"inner must be one of task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties, found 'mean'"):
        combine(mixed(), "knots", inner="mean")


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e4])
def test_knots_cut_off_is_relative_to_the_largest_singular_value(scale):
    """Updates of any size keep every component: knots with task_arithmetic stays the exact weighted sum."""
    parts = parts_of((2, scale), (3, scale), inp=7, out=9)
    a, b = MERGERS.get("knots").fn(parts, [0.5, 2.0], generator=None, inner="task_arithmetic")
    want = sum(w * p.scale * dense(p.a, p.b) for p, w in zip(parts, [0.5, 2.0]))
    assert a.shape[0] == 5
    torch.testing.assert_close(dense(a, b), want, rtol=1e-4, atol=1e-6 * scale)


def test_knots_with_fewer_input_features_than_the_summed_rank():
    """[ΔW_1 ΔW_2] is wider than tall in its basis only when in·n >= Σr; here Σr = 6 > n·in = 4."""
    parts = parts_of((3, 1.0), (3, 0.5), inp=2, out=8)
    a, b = MERGERS.get("knots").fn(parts, [1.0, 1.0], generator=None, inner="task_arithmetic")
    want = sum(p.scale * dense(p.a, p.b) for p in parts)
    torch.testing.assert_close(dense(a, b), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner", ["dare_linear", "dare_ties"])
def test_knots_draws_dare_masks_from_its_generator(inner):
    parts = parts_of((3, 1.0), (2, 1.0))
    fn = MERGERS.get("knots").fn
    first = fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(5), inner=inner, density=0.5)
    torch.manual_seed(123)  # the global stream must not matter
    second = fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(5), inner=inner, density=0.5)
    assert torch.equal(dense(*first), dense(*second))


def test_dare_ties_uses_its_density():
    """At density 0.5, dare_ties drops entries (and rescales) exactly as its generator's Bernoulli masks say."""
    parts = parts_of((2, 1.0), (3, 0.7), inp=4, out=3)
    fn = MERGERS.get("dare_ties").fn
    a, b = fn(parts, [1.0, 1.0], generator=torch.Generator().manual_seed(9), density=0.5, rank=3)
    g = torch.Generator().manual_seed(9)
    taus = torch.stack([p.dense() for p in parts])
    kept = torch.stack([t * torch.bernoulli(torch.full_like(t, 0.5), generator=g) / 0.5 for t in taus])
    votes = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = kept.sign() == votes
    want = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(dense(a, b).float(), want, rtol=1e-4, atol=1e-5)


def test_ties_uses_its_majority():
    """One big positive entry against two small negative ones: 'total' keeps the big one, 'frequency' the two."""
    parts = [Part(torch.tensor([[1.0]]), torch.tensor([[5.0]]), 1.0), Part(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), 1.0),
             Part(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), 1.0)]
    fn = MERGERS.get("ties").fn
    total = dense(*fn(parts, [1.0] * 3, density=1.0, majority="total"))
    freq = dense(*fn(parts, [1.0] * 3, density=1.0, majority="frequency"))
    assert total.item() == pytest.approx(5.0) and freq.item() == pytest.approx(-1.0)


def test_truncate_returns_orthonormal_a_even_at_rank_one():
    """PEFT's convention B = U S, A = Vᵀ, whatever the input rank."""
    for r in (1, 3):
        a, b = torch.randn(r, 6), torch.randn(4, r)
        ta, tb = truncate(a, b, 5)
        torch.testing.assert_close(ta @ ta.T, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(dense(ta, tb), dense(a, b), atol=1e-5, rtol=1e-5)


def test_linear_accepts_a_tiny_nonzero_weight_sum():
    states = mixed()[:2]
    out = combine(states, "linear", [1e-12, 0.0])
    for path in out.modules():
        assert_close(out.delta(path), weighted_sum(states, [1.0, 0.0], path) if path in states[0].tensors else 0 * out.delta(path))


def test_lego_sign_canonicalisation_holds_for_small_units():
    """Flipping both halves of units whose entries are all below 1 must not change the clustering."""
    s1, s2 = rand_lora(1, 4), rand_lora(2, 4)
    small = [lora(s.tensors["lin"]["lora_A.weight"] * 0.05, s.tensors["lin"]["lora_B.weight"] * 0.05, 8.0) for s in (s1, s2)]
    a, b = small[0].tensors["lin"]["lora_A.weight"], small[0].tensors["lin"]["lora_B.weight"]
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0])
    flipped = lora(a * flip[:, None], b * flip, 8.0)
    ref = combine(small, "lego", rank=3).delta("lin")
    torch.testing.assert_close(combine([flipped, small[1]], "lego", rank=3).delta("lin"), ref, atol=1e-7, rtol=1e-5)


def test_lego_with_duplicate_units_and_k_equal_to_their_number_is_cat():
    """k = N: every unit is its own cluster, duplicates included; without reweighting that is exact stacking."""
    s = rand_lora(1, 3)
    got = combine([s, s], "lego", rank=6, param_reweight=False, output_reweight=False)
    torch.testing.assert_close(got.delta("lin"), 2 * s.delta("lin"), atol=1e-5, rtol=1e-5)


def test_lego_clusters_fewer_distinct_units_than_k():
    """Two identical rank-2 inputs have 2 distinct units: asking for 3 clusters gives 2 centroids, the input."""
    s = rand_lora(1, 2)
    got = combine([s, s], "lego", rank=3, output_reweight=False)
    torch.testing.assert_close(got.delta("lin"), s.delta("lin"), atol=1e-5, rtol=1e-5)
    small = lora(s.tensors["lin"]["lora_A.weight"] * 0.01, s.tensors["lin"]["lora_B.weight"] * 0.01, 2.0)
    got = combine([small, small, rand_lora(3, 1, alpha=1.0)], "lego", rank=3, output_reweight=False)
    assert got.tensors["lin"]["lora_A.weight"].shape[0] == 3  # small but distinct units still seed clusters


def test_lego_drops_units_with_a_zero_half():
    a, b = torch.randn(3, 5), torch.randn(6, 3)
    a[1] = 0  # unit 1 has b but no a: no update, must be dropped (not divided by zero)
    got = combine([lora(a, b, 3.0), rand_lora(2, 2)], "lego", rank=2)
    assert torch.isfinite(got.tensors["lin"]["lora_A.weight"]).all()


def test_lego_forwards_n_init(monkeypatch):
    seen = []
    real = lego_module.kmeans
    monkeypatch.setattr(lego_module, "kmeans", lambda x, k, g, n_init=4: seen.append(n_init) or real(x, k, g, n_init))
    combine([rand_lora(1, 4), rand_lora(2, 3)], "lego", rank=2, n_init=2)
    assert seen == [2]


def test_combine_task_vectors_keeps_dtype_of_float64_vectors():
    got = combine_task_vectors(torch.randn(2, 8, dtype=torch.float64), [1.0, 1.0], "ties", density=0.5)
    assert got.dtype == torch.float64


def test_density_zero_is_refused():
    for variant in ("ties", "dare_linear"):
        with pytest.raises(MergeError, match=r"density must be in \(0, 1\], found 0.0"):
            combine_task_vectors(torch.ones(2, 3), [1.0, 1.0], variant, density=0.0)


def test_weights_are_applied_in_the_task_vectors_precision():
    taus = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = combine_task_vectors(taus, [0.1, 0.3], "task_arithmetic")
    assert torch.equal(got, 0.1 * taus[0] + 0.3 * taus[1])


def test_frequency_election_is_per_entry_and_ties_go_positive():
    taus = torch.tensor([[2.0, -3.0, 1.0], [-1.0, -1.0, 4.0], [-1.0, 5.0, 0.0]])
    # entry 0: one + two - -> -; entry 1: two - one + -> -; entry 2: two + (and a zero) -> +
    got = combine_task_vectors(taus, [1.0, 1.0, 1.0], "ties", majority="frequency")
    assert torch.equal(got, torch.tensor([-1.0, -2.0, 2.5]))
    tie = combine_task_vectors(torch.tensor([[2.0], [-1.0]]), [1.0, 1.0], "ties", majority="frequency")
    assert tie.item() == 2.0


def test_the_generator_is_not_a_knob():
    assert MERGERS.get("lego").knobs() == ["rank", "param_reweight", "output_reweight", "n_init"]
    with pytest.raises(MergeError, match="method 'dare_linear' has no setting generator; its settings: density, rank"):
        combine(mixed(), "dare_linear", generator=torch.Generator())
