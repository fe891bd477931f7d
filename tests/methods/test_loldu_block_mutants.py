"""LoLDU's rank limit and Block-LoRA's refusal, with their messages."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.block_lora import BlockLoRAConfig
from lorakit.methods.loldu import LoLDUConfig
from lorakit.testing import perturb_


def test_loldu_at_full_rank_is_allowed_and_exact():
    """r = min(out, in) is the largest rank the LDU factors give (catches: refusing r equal to the limit)."""
    base = nn.Linear(8, 5)
    model = lorakit.apply(nn.Sequential(base), LoLDUConfig(r=5, target_modules=["0"]))
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), base(x), rtol=1e-4, atol=1e-4)  # starts at W
    perturb_(model)
    delta = lorakit.AdapterState.from_model(model).delta("0")
    torch.testing.assert_close(model(x), x @ (base.weight + delta).T + base.bias, rtol=1e-4, atol=1e-4)


def test_loldu_rank_above_the_limit_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^module '0': rank r=6 exceeds min\(out, in\)=5$"):
        lorakit.apply(nn.Sequential(nn.Linear(8, 5)), LoLDUConfig(r=6, target_modules=["0"]))


def test_block_lora_indivisible_width_message():
    with pytest.raises(ValueError, match=r"^module '0': in_features=10 does not split into block_num=4 equal chunks; "
                                         r"choose a block_num that divides it or leave this module out of target_modules$"):
        lorakit.apply(nn.Sequential(nn.Linear(10, 4)), BlockLoRAConfig(r=2, block_num=4, target_modules=["0"]))
