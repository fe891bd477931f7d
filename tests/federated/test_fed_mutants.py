"""Aggregation maths pinned where mutation testing found it loose."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit.federated import aggregate, exact_update, normalised, relative_error, update_of
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
