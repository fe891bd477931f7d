"""SLoRA / NLoRA / IntTune claims: the three-matrix update B N A; SLoRA starts at zero; NLoRA's factors are W's
first r rows/columns (Nyström, exact for rank-r weights with the pinv core); IntTune trains r² per module."""
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.lora_xs import oriented
from lorakit.methods.nlora import NLoRAConfig
from lorakit.testing import ToyLinear, check_method

TARGETS = ["q_proj", "o_proj", "up_proj"]


def _config(**kw):
    return NLoRAConfig(**{"r": 8, "lora_alpha": 8, "target_modules": TARGETS, **kw})


def test_conformance():
    assert check_method("nlora")


@pytest.mark.parametrize("kw", [dict(mode="slora"), dict(mode="inttune"), dict(residual=True, nystrom_core="pinv")])
def test_conformance_modes(kw):
    assert check_method("nlora", config=NLoRAConfig(r=4, target_modules=ToyLinear.targets, **kw), toys=[ToyLinear])


def _count(model):
    return sum(p.numel() for p in lorakit.trainable_parameters(model).values())


def test_slora_starts_at_zero_and_trains_all_three(tiny):
    model = lorakit.apply(tiny.make(), _config(mode="slora"))
    torch.testing.assert_close(tiny.logits(model), tiny.logits(tiny.make()))
    in_out = {"q_proj": 64 + 64, "o_proj": 64 + 64, "up_proj": 64 + 128}
    assert _count(model) == sum(8 * in_out[p.rsplit(".", 1)[-1]] + 64 for p in lorakit.adapters(model))


def test_nlora_factors_are_rows_and_columns_of_w(tiny):
    model = lorakit.apply(tiny.make(), _config())
    for layer in lorakit.adapters(model).values():
        w = oriented(layer.base_layer.weight, layer.config)
        a, n, b = layer.lora_A.weight, layer.lora_N.weight, layer.lora_B.weight
        assert torch.equal(a, w[:8]) and torch.equal(b, w[:, :8]) and torch.equal(n, w[:8, :8])
    # as released, W is not offset: the model starts away from the pretrained one
    assert not torch.allclose(tiny.logits(model), tiny.logits(tiny.make()))


def test_pinv_core_reproduces_a_rank_r_weight():
    """Nyström: C W11⁺ R = W exactly when rank(W) = r and W11 is invertible."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(20, 12, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 4, generator=g) @ torch.randn(4, 20, generator=g))
    model = lorakit.apply(nn.Sequential(layer), NLoRAConfig(r=4, lora_alpha=4, target_modules=["0"], nystrom_core="pinv"))
    adapter = lorakit.adapters(model)["0"]
    torch.testing.assert_close(adapter.delta_weight(), adapter.base_layer.weight, atol=1e-4, rtol=1e-4)


def test_inttune_trains_only_the_middle(tiny):
    model = lorakit.apply(tiny.make(), _config(mode="inttune"))
    assert all(n.endswith("lora_N.weight") for n in lorakit.trainable_parameters(model))
    assert _count(model) == 6 * 8**2
    frozen = {p: (m.lora_A.weight.clone(), m.lora_B.weight.clone()) for p, m in lorakit.adapters(model).items()}
    tiny.train(model, steps=2, weight_decay=0.1)
    for path, layer in lorakit.adapters(model).items():
        assert torch.equal(layer.lora_A.weight, frozen[path][0]) and torch.equal(layer.lora_B.weight, frozen[path][1])


@pytest.mark.parametrize("mode", ["nlora", "inttune"])
@pytest.mark.parametrize("core", ["W11", "pinv"])
def test_residual_starts_at_the_pretrained_model(tiny, mode, core):
    model = lorakit.apply(tiny.make(), _config(mode=mode, nystrom_core=core, residual=True))
    torch.testing.assert_close(tiny.logits(model), tiny.logits(tiny.make()), atol=1e-5, rtol=1e-4)


def test_exports_to_a_peft_lora_file(tiny, tmp_path):
    from peft import PeftModel

    model = tiny.train(lorakit.apply(tiny.make(), _config(lora_alpha=16)), steps=2, lr=1e-3)
    lorakit.save_state(lorakit.AdapterState.from_model(model).to_lora(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny.make(), str(tmp_path))
    torch.testing.assert_close(tiny.logits(peft_model), tiny.logits(model), atol=1e-4, rtol=1e-4)
