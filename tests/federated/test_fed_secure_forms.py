"""Secure forms: each strategy that SecAgg+ can serve computes its aggregate from a weighted sum of what the
clients encode, equal to the plain aggregate; FLoRA has none."""
from __future__ import annotations

import pytest
import torch

from lorakit.federated import aggregate, exact_update, normalised, relative_error, update_of
from lorakit.federated.aggregation import SECURE, secure_aggregate
from lorakit.federated.conformance import synthetic_clients

CASES = [("fedit", [4, 4, 4], False), ("lora_fair", [4, 4, 4], False), ("ffa_lora", [4, 4, 4], True),
         ("ffa_lora", [2, 4, 8], True), ("zero_pad", [2, 4, 8], False), ("zero_pad", [4, 4, 4], False),
         ("fedavg_dense", [2, 4, 8], False)]


def test_every_strategy_but_flora_has_a_secure_form():
    assert set(SECURE) == {"fedit", "ffa_lora", "zero_pad", "fedavg_dense", "lora_fair"}


@pytest.mark.parametrize("name,ranks,shared", CASES)
def test_the_decoded_weighted_sum_equals_the_plain_aggregate(name, ranks, shared):
    states = synthetic_clients(ranks, spread=0.5, seed=7, shared_a=shared, head=True)
    widest = max(states, key=lambda s: s.config.r)
    reference = widest.clone()
    counts = [5, 2, 3]
    plain = aggregate(name, states, counts)
    secure = secure_aggregate(name, states, counts, reference)
    for path in plain.tensors:  # the same update s B A per module
        assert relative_error(update_of(secure, path), update_of(plain, path)) < 1e-6
    for key, t in plain.modules_to_save["head"].items():
        torch.testing.assert_close(secure.modules_to_save["head"][key], t)
    if name == "fedavg_dense":  # stored as factors of the dense mean: the rank stays at most sum of ranks
        weights = normalised(counts, 3)
        assert all(secure.low_rank(p)[0].shape[0] <= sum(ranks) for p in secure.tensors)
        assert all(relative_error(update_of(secure, p), exact_update(states, weights, p)) < 1e-6 for p in secure.tensors)
        return
    assert secure.config.to_dict() == plain.config.to_dict()  # the same factors and config, not only the product
    for path, tensors in plain.tensors.items():
        for key, t in tensors.items():
            torch.testing.assert_close(secure.tensors[path][key], t, rtol=1e-5, atol=1e-6)


def test_a_client_above_the_largest_rank_cannot_encode():
    states = synthetic_clients([8], seed=1)
    reference = synthetic_clients([4], seed=1)[0]
    with pytest.raises(ValueError, match="rank 8 is above the run's largest rank 4"):
        SECURE["zero_pad"].encode(states[0], reference.config)
