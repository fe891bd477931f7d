"""Aggregation maths pinned where mutation testing found it loose."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit.federated import aggregate
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
    with pytest.raises(ValueError, match="client 1 differs from client 0 in bias=.*fan_in_fan_out=.*lora_alpha=.*lora_dropout=") as err:
        aggregate("fedit", [a, other], [1, 1])
    assert "use_rslora" not in str(err.value)  # the fifth difference is left out of the one-line message
