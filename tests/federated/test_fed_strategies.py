"""Aggregation strategies: conformance over the registry, exactness, FedIT's closed form, errors."""
from __future__ import annotations

import pytest
import torch

from lorakit import AdapterState, DoRAConfig
from lorakit.federated import STRATEGIES, aggregate, exact_update, normalised, relative_error, update_of
from lorakit.federated.conformance import check_strategy, synthetic_clients
from lorakit.federated.strategies.lora_fair import fair_objective

BUILT_IN = {"fedit", "ffa_lora", "flora", "lora_fair", "fedavg_dense", "zero_pad"}


def test_built_in_strategies_are_registered():
    assert BUILT_IN <= set(STRATEGIES.names())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_conformance(name):
    assert len(check_strategy(name)) == 7


EXACT_CASES = {
    "flora": [([8, 8, 8, 8], False), ([2, 4, 8, 16], False)],
    "fedavg_dense": [([8, 8, 8, 8], False), ([2, 4, 8, 16], False)],
    "ffa_lora": [([8, 8, 8, 8], True), ([2, 4, 8, 16], True)],
}


@pytest.mark.parametrize("name,ranks,shared", [(n, r, s) for n, cases in EXACT_CASES.items() for r, s in cases])
def test_exact_strategies_reproduce_the_weighted_sum_of_updates(name, ranks, shared):
    states = synthetic_clients(ranks, spread=1.0, seed=3, shared_a=shared)
    counts = [3, 1, 4, 1]
    out = aggregate(name, states, counts)
    weights = normalised(counts, len(states))
    for path in out.tensors:
        err = relative_error(update_of(out, path), exact_update(states, weights, path))
        assert err < 1e-6, f"{name} ranks {ranks}: {path} relative error {err:.2e}"


def test_flora_stacks_to_the_sum_of_client_ranks():
    states = synthetic_clients([2, 4, 8], seed=4)
    out = aggregate("flora", states, [1, 1, 1])
    assert out.low_rank("enc.q")[0].shape[0] == 14
    assert out.config.for_module("enc.q").r == 14 and out.config.for_module("enc.q").scaling == 1.0


@pytest.mark.parametrize("spread", [0.05, 0.5, 2.0])
def test_fedit_error_equals_the_closed_form(spread):
    states = synthetic_clients([4, 4, 4, 4], spread=spread, seed=5, dtype=torch.float64)
    counts = [5, 1, 2, 2]
    p = normalised(counts, 4)
    out = aggregate("fedit", states, counts)
    for path in out.tensors:
        error = exact_update(states, p, path) - update_of(out, path)
        fac = [(s.low_rank(path)[0], s.low_rank(path)[1]) for s in states]
        scale = states[0].low_rank(path)[2]
        closed = 0.5 * scale * sum(
            p[k] * p[l] * (fac[k][1] - fac[l][1]) @ (fac[k][0] - fac[l][0]) for k in range(4) for l in range(4)
        )
        assert relative_error(error, closed) < 1e-10
        assert error.norm() > 1e-6 * exact_update(states, p, path).norm()  # FedIT really is inexact here


def test_fedit_is_exact_when_all_a_agree():
    states = synthetic_clients([4, 4, 4], seed=6, shared_a=True)
    out = aggregate("fedit", states, [1, 2, 3])
    p = normalised([1, 2, 3], 3)
    assert relative_error(update_of(out, "enc.q"), exact_update(states, p, "enc.q")) < 1e-6


def test_weights_are_normalised_by_example_counts():
    states = synthetic_clients([4, 4], seed=7)
    out = aggregate("fedit", states, [1, 3])
    want = 0.25 * states[0].tensors["enc.v"]["lora_B.weight"] + 0.75 * states[1].tensors["enc.v"]["lora_B.weight"]
    assert torch.allclose(out.tensors["enc.v"]["lora_B.weight"], want, atol=1e-7)
    assert normalised([2, 2, 4], 3) == [0.25, 0.25, 0.5]
    assert normalised([0, 5], 2) == [0.0, 1.0]


@pytest.mark.parametrize("counts", [[1, -1], [0, 0], [1, float("nan")], [1]])
def test_bad_example_counts_are_rejected(counts):
    with pytest.raises(ValueError, match="example count"):
        aggregate("fedit", synthetic_clients([4, 4]), counts)


def test_lora_fair_moves_b_towards_the_ideal_update():
    states = synthetic_clients([4, 4, 4, 4], spread=1.0, seed=8)
    p = normalised([1, 1, 1, 1], 4)
    fedit, fair = aggregate("fedit", states, [1] * 4), aggregate("lora_fair", states, [1] * 4)
    for path in fair.tensors:
        target = exact_update(states, p, path)
        a, b, s = (t.double() if torch.is_tensor(t) else t for t in fedit.low_rank(path))
        _, b_fair, _ = fair.low_rank(path)
        assert torch.equal(fair.tensors[path]["lora_A.weight"], fedit.tensors[path]["lora_A.weight"])  # A_bar kept
        before = float(fair_objective(target, b, a, s, 0.01, torch.zeros_like(b)))
        after = float(fair_objective(target, b, a, s, 0.01, b_fair.double() - b))
        assert after < before - 1e-3, f"{path}: objective {before:.4f} -> {after:.4f}"
        cos = lambda x: float(torch.nn.functional.cosine_similarity(x.flatten(), target.flatten(), dim=0))  # noqa: E731
        assert cos(update_of(fair, path)) > cos(update_of(fedit, path))


def test_lora_fair_residual_is_zero_when_fedit_is_already_exact():
    states = synthetic_clients([4, 4], seed=9, shared_a=True)
    fedit, fair = aggregate("fedit", states, [1, 1]), aggregate("lora_fair", states, [1, 1])
    assert torch.equal(fair.tensors["enc.q"]["lora_B.weight"], fedit.tensors["enc.q"]["lora_B.weight"])


def test_zero_pad_equals_fedit_for_equal_ranks_and_not_exact_for_mixed():
    states = synthetic_clients([4, 4, 4], seed=10)
    zp, fi = aggregate("zero_pad", states, [1, 2, 3]), aggregate("fedit", states, [1, 2, 3])
    assert zp.config == fi.config
    assert torch.allclose(zp.tensors["enc.q"]["lora_B.weight"], fi.tensors["enc.q"]["lora_B.weight"], atol=1e-7)
    mixed = synthetic_clients([2, 4, 8], seed=10)
    out = aggregate("zero_pad", mixed, [1, 1, 1])
    assert out.config.r == 8
    assert relative_error(update_of(out, "enc.q"), exact_update(mixed, normalised([1] * 3, 3), "enc.q")) > 0.01


def test_ffa_lora_refuses_clients_with_different_a():
    with pytest.raises(ValueError, match="another A on module"):
        aggregate("ffa_lora", synthetic_clients([4, 4], seed=11, spread=0.1), [1, 1])


def test_equal_rank_strategies_refuse_mixed_ranks_with_a_clear_message():
    with pytest.raises(ValueError, match="client 1 differs from client 0 in lora_alpha=4.*r=2"):
        aggregate("fedit", synthetic_clients([4, 2], seed=12), [1, 1])


def test_clients_must_adapt_the_same_modules():
    a, b = synthetic_clients([4, 4], seed=13)
    b = AdapterState(b.config, {"enc.q": b.tensors["enc.q"]})
    with pytest.raises(ValueError, match="differ in their adapted modules.*enc.v"):
        aggregate("flora", [a, b], [1, 1])


def test_factor_strategies_name_methods_without_a_low_rank_form():
    one = synthetic_clients([4], seed=14)[0]
    dora = AdapterState(DoRAConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
                        {p: {**d, "lora_magnitude_vector": torch.ones(d["lora_B.weight"].shape[0])} for p, d in one.tensors.items()})
    with pytest.raises(ValueError, match="no exact low-rank form.*use strategy 'fedit'"):
        aggregate("flora", [dora, dora], [1, 1])
    out = aggregate("fedit", [dora, dora], [1, 1])  # key-wise averaging works for any method
    assert torch.equal(out.tensors["enc.q"]["lora_magnitude_vector"], dora.tensors["enc.q"]["lora_magnitude_vector"])


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(KeyError, match="Registered: .*flora"):
        aggregate("flor", synthetic_clients([4]), [1])


def test_float64_clients_stay_float64():
    out = aggregate("flora", synthetic_clients([4, 4], dtype=torch.float64), [1, 1])
    assert out.tensors["enc.q"]["lora_A.weight"].dtype == torch.float64
