"""Adapters of other exactly low-rank methods merge through their ``low_rank`` factors into plain LoRA."""
from __future__ import annotations

import torch
from torch import nn

import lorakit
from lorakit.merging import combine
from lorakit.testing import perturb_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 8)
        self.v = nn.Linear(16, 12)


def _state(config, seed):
    torch.manual_seed(seed)
    model = lorakit.apply(Net(), config)
    perturb_(model, seed=seed)
    return lorakit.AdapterState.from_model(model), model


def test_block_lora_and_lora_cat_equals_sum_of_updates():
    block, model = _state(lorakit.METHODS.get("block_lora").config_class(r=4, target_modules=["q", "v"], block_num=4), 0)
    plain, _ = _state(lorakit.LoRAConfig(r=2, target_modules=["q", "v"]), 1)
    merged = combine([block, plain], "cat")
    assert merged.config.method_name == "lora"
    for path in ("q", "v"):
        w = model.get_submodule(path).base_layer.weight
        expected = block.delta(path, w) + plain.delta(path, w)
        torch.testing.assert_close(merged.delta(path, w), expected, atol=1e-5, rtol=1e-5)
