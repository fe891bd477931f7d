"""FFA-LoRA's frozen A is a recipe every client regenerates (pinned here, written out independently), and its
refusal names the module; DoRA's forward with dropout active, and its magnitude reset in place."""
import math
import zlib

import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.ffa_lora import FFALoRAConfig, frozen_a
from lorakit.testing import perturb_


@pytest.mark.parametrize("init", [True, "gaussian", "Gaussian"])
def test_frozen_a_recipe(init):
    """A = U(-1/sqrt(in), 1/sqrt(in)) (or N(0, 1)/r for 'gaussian') from torch.Generator seeded with
    crc32('<ffa_seed>/<module path>'). Catches: another seed, path, range or scale (clients would disagree)."""
    config = FFALoRAConfig(r=3, ffa_seed=7, init_lora_weights=init)
    a = frozen_a(config, "layers.0.q", 16)
    g = torch.Generator().manual_seed(zlib.crc32(b"7/layers.0.q"))
    if init is True:
        want = torch.rand(3, 16, generator=g) * (2 / math.sqrt(16)) - 1 / math.sqrt(16)
    else:
        want = torch.randn(3, 16, generator=g) / 3
    torch.testing.assert_close(a, want)


def test_frozen_a_is_in_the_adapter_and_b_starts_at_zero():
    model = lorakit.apply(nn.Sequential(nn.Linear(16, 4)), FFALoRAConfig(r=3, ffa_seed=7, target_modules=["0"]))
    layer = lorakit.adapters(model)["0"]
    torch.testing.assert_close(layer.lora_A.weight, frozen_a(layer.config, "0", 16))
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_unsupported_init_is_refused_by_module():
    with pytest.raises(ValueError) as err:
        lorakit.apply(nn.Sequential(nn.Linear(4, 4)), FFALoRAConfig(r=2, init_lora_weights="pissa", target_modules=["0"]))
    assert str(err.value) == ("module '0': FFA-LoRA supports init_lora_weights True, False or 'gaussian', "
                              "found 'pissa'")


@pytest.mark.parametrize("init", [False, "gaussian", "GAUSSIAN"])
def test_supported_inits_are_accepted(init):
    """Catches: False or 'gaussian' (any case) refused."""
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 4)), FFALoRAConfig(r=2, init_lora_weights=init, target_modules=["0"]))
    layer = lorakit.adapters(model)["0"]
    torch.testing.assert_close(layer.lora_A.weight, frozen_a(layer.config, "0", 8))


def test_reset_parameters_regenerates_a_in_place():
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 4)), FFALoRAConfig(r=2, target_modules=["0"]))
    layer = lorakit.adapters(model)["0"]
    with torch.no_grad():
        layer.lora_A.weight.mul_(3)
    layer.reset_parameters()
    torch.testing.assert_close(layer.lora_A.weight, frozen_a(layer.config, "0", 8))


class _FixedMask(nn.Module):
    """A dropout stand-in with a known mask (inverted-dropout scaling by 2)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask * 2


def test_dora_with_dropout_in_training_matches_peft_form():
    """With dropout active the update sees the dropped input x_d, the base output the full one (PEFT's form):
    y = W x + b + g (W x_d + s B A x_d) − W x_d, g = m / |W + s B A| per output. Catches any slip in that path."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    model = lorakit.apply(nn.Sequential(base), lorakit.DoRAConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["0"]))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    mask = (torch.arange(8) % 3 != 0).float()
    layer.lora_dropout = _FixedMask(mask)
    model.train()
    x = torch.randn(5, 8)
    xd = x * mask * 2
    w, s = base.weight.detach(), layer.scaling
    ba = (layer.lora_B.weight @ layer.lora_A.weight).detach()
    g = layer.lora_magnitude_vector.detach() / (w + s * ba).norm(dim=1)
    want = base(x) + g * (xd @ w.T + s * xd @ ba.T) - xd @ w.T
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_dora_reset_keeps_the_magnitude_parameter():
    """A second reset rewrites the magnitude in place (an optimiser holding it keeps working)."""
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 6)), lorakit.DoRAConfig(r=2, target_modules=["0"]))
    layer = lorakit.adapters(model)["0"]
    magnitude = layer.lora_magnitude_vector
    with torch.no_grad():
        magnitude.mul_(3)
    layer.reset_parameters()
    assert layer.lora_magnitude_vector is magnitude
    torch.testing.assert_close(magnitude.detach(), layer.base_layer.weight.detach().norm(dim=1))


def test_dora_with_dropout_over_a_bf16_base_returns_bf16():
    """Catches: the base weight not cast to the float32 input in the dropout path, or the output not cast back."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    model = lorakit.apply(nn.Sequential(base), lorakit.DoRAConfig(r=2, lora_dropout=0.5, target_modules=["0"]))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    layer.lora_dropout = _FixedMask(torch.ones(8) / 2)  # keeps every input: the same function as without dropout
    model.train()
    x = torch.randn(5, 8).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    model.eval()
    torch.testing.assert_close(out.float(), model(x).float(), rtol=0.02, atol=0.02)
