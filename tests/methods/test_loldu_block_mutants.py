"""LoLDU's rank limit and Block-LoRA's refusal, with their messages."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.block_lora import BlockLoRAConfig
from lorakit.methods.loldu import LoLDUConfig, ldu
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


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ldu_clamps_a_tiny_pivot_keeping_its_sign(sign):
    """A pivot below 1e-8 in magnitude is clamped to ±1e-8 with its own sign, so D_k · U_k keeps the direction of
    the LU's row k (catches: a positive tiny pivot clamped to −1e-8, or a negative one to +1e-8)."""
    w = torch.tensor([[1.0, 0.0], [0.0, sign * 5e-9]])
    _, d, upper = ldu(w, 2)
    _, _, lu_upper = torch.linalg.lu(w)
    torch.testing.assert_close(upper[1], lu_upper[1] / (sign * 1e-8))
    assert (d[:, None] * upper * lu_upper).sum(1).gt(0).all()


@pytest.mark.parametrize("init_method", ["lu", "ones", "zeros", "constant"])
def test_loldu_init_methods_start_z_as_documented(init_method):
    """Catches: an init_method name that no longer selects its start (a KeyError, or another start)."""
    base = torch.nn.Linear(8, 6)
    model = lorakit.apply(nn.Sequential(base), LoLDUConfig(r=3, init_method=init_method, target_modules=["0"]))
    z = lorakit.adapters(model)["0"].loldu_z.detach()
    d = ldu(base.weight.detach(), 3)[1]
    want = {"lu": d, "ones": torch.ones(3), "zeros": torch.zeros(3), "constant": d.mean().expand(3)}[init_method]
    torch.testing.assert_close(z, want)
