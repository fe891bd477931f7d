"""Conformance: every registered method passes ``check_method``; LoRA and DoRA also on real HF architectures."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.testing import check_method

CONFIGS = {"lora": lorakit.LoRAConfig, "dora": lorakit.DoRAConfig}


@pytest.mark.parametrize("name", lorakit.METHODS.names())
def test_check_method(name):
    checked = check_method(name)
    assert any(c.endswith(": save/load") for c in checked)


def _close(a, b, what, atol=1e-5):
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=1e-5), f"{what}: max abs difference {err:.3g}"


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model_name", ["gpt2", "llama", "bert"])
def test_hf_model_properties(method, model_name, request, perturb, tmp_path):
    tiny = request.getfixturevalue(model_name)
    base_out = tiny.run(tiny.make())
    model = lorakit.apply(tiny.make(), CONFIGS[method](r=4, lora_alpha=8, target_modules=tiny.targets))
    wrapped = lorakit.adapters(model)
    assert wrapped and {p.rsplit(".", 1)[-1] for p in wrapped} == set(tiny.targets)
    assert all(a.name == method for a in wrapped.values())
    _close(tiny.run(model), base_out, f"{method}/{model_name}: output at initialisation")

    perturb(model)
    out = tiny.run(model)
    assert (out - base_out).abs().max() > 1e-3, "the perturbed adapter should change the output"
    with lorakit.disabled(model):
        _close(tiny.run(model), base_out, f"{method}/{model_name}: disabled output")
    _close(tiny.run(model), out, f"{method}/{model_name}: output after leaving disabled()")

    merged = lorakit.merge(copy.deepcopy(model))
    assert not lorakit.adapters(merged)
    _close(tiny.run(merged), out, f"{method}/{model_name}: merged output")

    lorakit.save_peft(model, tmp_path)
    loaded = lorakit.load_peft(tiny.make(), tmp_path)
    _close(tiny.run(loaded), out, f"{method}/{model_name}: output after save_peft/load_peft")
    assert not lorakit.trainable_parameters(loaded), "load_peft loads for inference unless is_trainable=True"
    trainable = lorakit.load_peft(tiny.make(), tmp_path, is_trainable=True)
    assert set(lorakit.trainable_parameters(trainable)) == set(lorakit.trainable_parameters(model))
