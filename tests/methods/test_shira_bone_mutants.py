"""SHiRA's and Bone's refusals at their limits, with their messages, and SHiRA's index pairs for weights past
float32's exact integers."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.bone import BoneConfig
from lorakit.methods.shira import SHiRAConfig, _as_pairs
from lorakit.testing import perturb_

MESSAGES = [
    (SHiRAConfig(r=0, target_modules=["0"]), nn.Linear(4, 4),
     "module '0': SHiRA r=0 asks for 0 trainable entries, but the weight (4, 4) has 16; use r <= 2"),
    (SHiRAConfig(r=3, target_modules=["0"]), nn.Linear(4, 4),
     "module '0': SHiRA r=3 asks for 24 trainable entries, but the weight (4, 4) has 16; use r <= 2"),
    (BoneConfig(r=6, target_modules=["0"]), nn.Linear(5, 4),
     "module '0': r=6 exceeds in_features=5; choose another r or exclude the module"),
    (BoneConfig(r=3, init_weights="bat", target_modules=["0"]), nn.Linear(6, 4),
     "module '0': 'bat' needs in (6) and out (4) divisible by r=3; choose another r or exclude the module"),
    (BoneConfig(r=2, init_weights="bat", target_modules=["0"]), nn.Linear(6, 3),
     "module '0': 'bat' needs in (6) and out (3) divisible by r=2; choose another r or exclude the module"),
    (BoneConfig(r=2, init_weights="mini", mini_r=3, target_modules=["0"]), nn.Linear(6, 4),
     "module '0': 'mini' needs out (4) divisible by mini_r=3; choose another r or exclude the module"),
]


@pytest.mark.parametrize("config, layer, message", MESSAGES)
def test_refused_with_the_fix(config, layer, message):
    with pytest.raises(ValueError) as err:
        lorakit.apply(nn.Sequential(layer), config)
    assert str(err.value) == message


@pytest.mark.parametrize("config, layer", [
    (SHiRAConfig(r=2, target_modules=["0"]), nn.Linear(4, 4)),  # every entry of the weight trains
    (BoneConfig(r=5, target_modules=["0"]), nn.Linear(5, 4)),  # one shard as wide as the input
])
def test_the_limit_itself_is_allowed(config, layer):
    x = torch.randn(3, layer.in_features)
    model = lorakit.apply(nn.Sequential(layer), config)
    perturb_(model)
    delta = lorakit.AdapterState.from_model(model).delta("0", layer.weight.detach())
    torch.testing.assert_close(model(x), x @ (layer.weight + delta).T + layer.bias)
    assert torch.count_nonzero(delta) == delta.numel() or isinstance(config, BoneConfig)


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_data_driven_support_refuses_to_train_uncalibrated(mask_type):
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 6)), SHiRAConfig(r=1, mask_type=mask_type, target_modules=["0"]))
    model.train()
    with pytest.raises(RuntimeError) as err:
        model(torch.randn(2, 8))
    assert str(err.value) == (
        f"module '0': mask_type={mask_type!r} needs calibration data before training; build the model with "
        "lorakit.init.shira_masks.calibrate(model, config, batches, loss_fn)")


def test_index_pairs_are_exact_past_float32_integers():
    """A 4096 x 4097 weight has flat indices above 2^24. Catches: a true division (float32 rounding)."""
    in_f = 4097
    flat = torch.tensor([4095 * in_f + 4096, 4096 * in_f - 1, 5, in_f])
    pairs = _as_pairs(flat, in_f)
    assert pairs.dtype == torch.int32
    assert pairs.tolist() == [[4095, 4095, 0, 1], [4096, 4096, 5, 0]]


def test_bone_init_false_draws_kaiming_uniform_with_a_sqrt5():
    """init_weights=False: M ~ U(-1/sqrt(out), 1/sqrt(out)), nn.Linear's Kaiming-uniform with a = sqrt(5) on the
    [r, out] block (as PEFT). Catches: another slope a, hence another bound."""
    torch.manual_seed(0)
    model = lorakit.apply(nn.Sequential(nn.Linear(64, 64)), BoneConfig(r=8, init_weights=False, target_modules=["0"]))
    block = lorakit.adapters(model)["0"].miss_block.detach()
    bound = 1 / 64 ** 0.5
    assert 0.95 * bound < block.abs().max() <= bound
