"""Aggregation maths pinned where mutation testing found it loose."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit import AdapterState, LoRAConfig
from lorakit.federated import aggregate, aggregation_error, exact_update, normalised, relative_error, update_of
from lorakit.federated.aggregation import with_ranks
from lorakit.federated.strategies.lora_fair import fair_objective
from lorakit.federated.conformance import synthetic_clients
from lorakit.federated.strategies.fedavg_dense import exact_factors


def test_exact_factors_have_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3):
        delta = torch.randn(7, r, generator=g, dtype=torch.float64) @ torch.randn(r, 5, generator=g, dtype=torch.float64)
        a, b = exact_factors(delta)
        assert a.shape == (r, 5) and b.shape == (7, r)
        torch.testing.assert_close(b @ a, delta)
    a, b = exact_factors(torch.zeros(4, 3, dtype=torch.float64))  # a zero update keeps one (zero) unit
    assert a.shape[0] == 1 and (b @ a == 0).all()


def test_config_mismatch_message_names_at_most_four_fields():
    a, b = synthetic_clients([4, 4], seed=1)
    cfg = dataclasses.replace(b.config, lora_alpha=3, lora_dropout=0.1, use_rslora=True, bias="all", fan_in_fan_out=True)
    other = type(b)(cfg, b.tensors)
    with pytest.raises(ValueError, match=r"strategy 'fedit' needs one adapter config for all clients; client 1 differs "
                       r"from client 0 in bias='all' \(client 0: 'none'\), fan_in_fan_out=True \(client 0: False\), "
                       r"lora_alpha=3 \(client 0: 8\), lora_dropout=0.1 \(client 0: 0.0\)$") as err:
        aggregate("fedit", [a, other], [1, 1])
    assert "use_rslora" not in str(err.value)  # the fifth difference is left out of the one-line message


def test_ffa_lora_takes_the_shared_init_from_the_widest_client_wherever_it_is():
    states = synthetic_clients([16, 4, 8, 2], seed=2, shared_a=True)
    out = aggregate("ffa_lora", states, [1, 2, 3, 4])
    weights = normalised([1, 2, 3, 4], 4)
    for path in out.tensors:
        assert out.low_rank(path)[0].shape[0] == 16
        assert relative_error(update_of(out, path), exact_update(states, weights, path)) < 1e-6


def test_relative_error_golden():
    x = torch.tensor([[0.003, -0.004]])  # ||x|| = 0.005: below 1, so no clamp may bind
    assert relative_error(2 * x, x) == pytest.approx(1.0)
    assert relative_error(x, x) == 0.0


def test_aggregation_error_is_the_mean_relative_error_over_modules():
    states, counts = synthetic_clients([4, 4, 4], seed=6), [1, 2, 5]
    fedit = aggregate("fedit", states, counts)
    p = normalised(counts, 3)
    want = sum(relative_error(update_of(fedit, m), exact_update(states, p, m)) for m in fedit.tensors) / len(fedit.tensors)
    assert aggregation_error(fedit, states, counts) == pytest.approx(want) and want > 1e-3
    assert aggregation_error(aggregate("flora", states, counts), states, counts) < 1e-6


def test_non_integer_common_scaling_is_kept_by_the_padding_strategies():
    states = synthetic_clients([2, 4, 8], seed=7, shared_a=True)
    states = [AdapterState(dataclasses.replace(s.config, lora_alpha=0.75 * s.config.r), s.tensors) for s in states]
    out = aggregate("ffa_lora", states, [1, 1, 2])
    p = normalised([1, 1, 2], 3)
    for m in out.tensors:
        assert out.config.for_module(m).scaling == pytest.approx(0.75)
        assert relative_error(update_of(out, m), exact_update(states, p, m)) < 1e-6


def test_with_ranks_keeps_a_config_that_already_fits_and_writes_minimal_patterns():
    cfg = LoRAConfig(r=4, lora_alpha=8, rank_pattern={"enc\\.q": 8}, alpha_pattern={"enc\\.q": 16}, target_modules=["q", "v"])
    assert with_ranks(cfg, {"enc.q": 8, "enc.v": 4}, {"enc.q": 2.0, "enc.v": 2.0}) is cfg
    rs = LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["a", "b", "c"])
    out = with_ranks(rs, {"a": 2, "b": 2, "c": 8}, {"a": 0.5, "b": 0.5, "c": 0.5})
    assert (out.r, out.lora_alpha, out.use_rslora) == (2, 1.0, False)  # the most common rank and alpha
    assert out.rank_pattern == {"c": 8} and out.alpha_pattern == {"c": 4.0}
    assert [out.for_module(p).scaling for p in "abc"] == [0.5, 0.5, 0.5]


def test_lora_fair_objective_golden():
    eye = torch.eye(2, dtype=torch.float64)
    db = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # approx = diag(1, 2), target = 2 I: cos = 6 / (sqrt(5) sqrt(8)); penalty 0.5 * ||db|| = 0.5
    got = fair_objective(2 * eye, eye, eye, 1.0, 0.5, db)
    assert float(got) == pytest.approx(1 - 6 / (5**0.5 * 8**0.5) + 0.5, rel=1e-12)
    for tiny in (1e-12, 1e-9):  # the cosine does not depend on the update's scale, however small
        scaled = fair_objective(2 * tiny * eye, tiny * eye, eye, 1.0, 0.0, tiny * db)
        assert float(scaled) == pytest.approx(1 - 6 / (5**0.5 * 8**0.5), rel=1e-9)


def test_lora_fair_names_itself_and_takes_its_step_size():
    with pytest.raises(ValueError, match="strategy 'lora_fair' needs one adapter config"):
        aggregate("lora_fair", synthetic_clients([4, 2], seed=12), [1, 1])
    states = synthetic_clients([4, 4], seed=8)
    frozen, fedit = aggregate("lora_fair", states, [1, 1], lr=0.0), aggregate("fedit", states, [1, 1])
    assert torch.equal(frozen.tensors["enc.q"]["lora_B.weight"], fedit.tensors["enc.q"]["lora_B.weight"])


def test_fedit_names_itself_in_its_config_error():
    with pytest.raises(ValueError, match="strategy 'fedit' needs one adapter config"):
        aggregate("fedit", synthetic_clients([4, 2], seed=12), [1, 1])
