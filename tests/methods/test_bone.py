"""Bone / MiSS claims: PEFT MiSS files load with the same outputs and lorakit's files load in PEFT (every
variant); the default update adds the same r-column block to every shard (rank <= r, r·out parameters); Bat's
update is W_ij T_i + T_i, guided by the weight."""
import json
import warnings

import pytest
import torch

import lorakit
from lorakit.methods.bone import BoneConfig, BoneLinear
from lorakit.testing import ToyLinear, check_method, perturb_

TARGETS = ["q_proj", "v_proj", "down_proj"]
VARIANTS = [dict(r=12), dict(r=8, init_weights="bat"), dict(r=8, init_weights="mini", mini_r=4)]


@pytest.mark.parametrize("kw", [{}, dict(r=5), dict(init_weights="bat"), dict(init_weights="mini", mini_r=4)])
def test_conformance(kw):
    config = BoneConfig(**{"r": 4, "target_modules": ToyLinear.targets, **kw}) if kw else None
    assert check_method("bone", config=config, toys=[ToyLinear] if kw else None)


@pytest.mark.parametrize("kw", VARIANTS, ids=["miss-remainder", "bat", "mini"])
def test_peft_miss_files_both_ways(tiny, tmp_path, kw):
    from peft import MissConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(tiny.make(), MissConfig(target_modules=TARGETS, **kw))
    perturb = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name:
                p.add_(torch.randn(p.shape, generator=perturb) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = lorakit.load_peft(tiny.make(), tmp_path / "peft")
    assert isinstance(lorakit.config_of(ours), BoneConfig)
    torch.testing.assert_close(tiny.logits(ours), tiny.logits(peft_model), atol=1e-5, rtol=1e-4)

    model = lorakit.apply(tiny.make(), BoneConfig(target_modules=TARGETS, **kw))
    perturb_(model, scale=0.05)
    lorakit.save_peft(model, tmp_path / "ours")
    assert "init_lora_weights" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unexpected keyword")  # PEFT knows every field in the file
        back = PeftModel.from_pretrained(tiny.make(), str(tmp_path / "ours"))
    torch.testing.assert_close(tiny.logits(back), tiny.logits(model), atol=1e-5, rtol=1e-4)


def test_default_update_repeats_one_block(tiny):
    model = lorakit.apply(tiny.make(), BoneConfig(r=8, target_modules=TARGETS))
    assert sum(p.numel() for p in lorakit.trainable_parameters(model).values()) == 2 * 8 * (64 + 32 + 64)
    tiny.train(model, steps=2)
    for layer in lorakit.adapters(model).values():
        delta = layer.delta_weight()
        shards = delta.split(8, dim=1)
        assert all(torch.equal(s, shards[0]) for s in shards)
        assert torch.linalg.matrix_rank(delta) <= 8 and delta.abs().sum() > 0


def test_bat_update_is_weight_guided():
    g = torch.Generator().manual_seed(0)
    config = BoneConfig(r=4, init_weights="bat")
    w, t = torch.randn(8, 12, generator=g), torch.randn(2, 4, 4, generator=g)
    delta = BoneLinear.delta({"miss_block": t}, config, w)
    for i in range(2):
        for j in range(3):
            block = w[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            torch.testing.assert_close(delta[4 * i:4 * i + 4, 4 * j:4 * j + 4], block @ t[i] + t[i])
    assert not torch.allclose(BoneLinear.delta({"miss_block": t}, config, 2 * w), delta)
