"""fan_in_fan_out follows the layers' weight layout: set for Conv1D, cleared (with a warning) for nn.Linear as PEFT
does, and a target set that mixes both layouts is refused (one flag cannot describe both)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)  # not square: a transposed update cannot fit
        self.conv = Conv1D(4, 6)

    def forward(self, x):
        return self.lin(x) + self.conv(x)


def test_fan_in_fan_out_on_linear_targets_is_cleared_with_a_warning_and_the_update_fits():
    torch.manual_seed(0)
    model = Mixed()
    with pytest.warns(UserWarning, match="fan_in_fan_out=True, but the targets are nn.Linear"):
        lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["lin"], fan_in_fan_out=True,
                                                init_lora_weights=False))
    assert lorakit.config_of(model).fan_in_fan_out is False
    x = torch.randn(3, 6)
    out = model(x)
    merged = lorakit.merge(model)
    assert torch.allclose(merged(x), out, atol=1e-6)


def test_targets_that_mix_linear_and_conv1d_are_refused():
    with pytest.raises(ValueError, match="mix nn.Linear and Conv1D"):
        lorakit.apply(Mixed(), lorakit.LoRAConfig(r=2, target_modules=["lin", "conv"]))
