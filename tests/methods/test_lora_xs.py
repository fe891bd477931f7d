"""LoRA-XS claims: r² trainable parameters per module whatever its width; B and A are the truncated SVD of W
(the best rank-r approximation, B orthonormal); the update stays inside their spans; files export as LoRA."""
import warnings

import torch

import lorakit
from lorakit.methods.lora_xs import LoRAXSConfig, oriented
from lorakit.testing import check_method

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _config(**kw):
    return LoRAXSConfig(**{"r": 8, "lora_alpha": 8, "target_modules": TARGETS, **kw})


def test_conformance():
    assert check_method("lora_xs")


def test_r_squared_trainable_parameters(tiny):
    model = lorakit.apply(tiny.make(), _config())
    trainable = lorakit.trainable_parameters(model)
    assert len(lorakit.adapters(model)) == 8
    assert all(n.endswith("lora_R.weight") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 8 * 8**2  # independent of in/out (64..128 here)


def test_factors_are_the_truncated_svd(tiny):
    model = lorakit.apply(tiny.make(), _config())
    for path, layer in lorakit.adapters(model).items():
        w = oriented(layer.base_layer.weight, layer.config).detach()
        b, a = layer.lora_B.weight, layer.lora_A.weight
        torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)
        sigma = torch.linalg.svdvals(w)
        # Eckart-Young: the rank-8 residual carries exactly the tail singular values
        torch.testing.assert_close((w - b @ a).norm() ** 2, (sigma[8:] ** 2).sum(), rtol=1e-4, atol=1e-6)
        assert layer.delta_weight().abs().max() < 1e-4 * w.abs().max(), path  # R ~ N(0, 1e-5²): near-identity


def test_update_stays_in_the_frozen_subspaces(tiny):
    model = lorakit.apply(tiny.make(), _config())
    frozen = {p: (m.lora_A.weight.clone(), m.lora_B.weight.clone()) for p, m in lorakit.adapters(model).items()}
    tiny.train(model, steps=3, weight_decay=0.1)
    for path, layer in lorakit.adapters(model).items():
        a, b = frozen[path]
        assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)
        delta = oriented(layer.delta_weight(), layer.config)
        assert delta.norm() > 1e-4
        col = b @ torch.linalg.pinv(b)
        row = torch.linalg.pinv(a) @ a
        torch.testing.assert_close(col @ delta @ row, delta, atol=1e-6, rtol=1e-4)


def test_exports_to_a_peft_lora_file(tiny, tmp_path):
    from peft import PeftModel

    model = tiny.train(lorakit.apply(tiny.make(), _config(lora_alpha=16)), steps=2)
    lora = lorakit.AdapterState.from_model(model).to_lora()
    assert type(lora.config) is lorakit.LoRAConfig and lora.config.r == 8
    lorakit.save_state(lora, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny.make(), str(tmp_path))
    torch.testing.assert_close(tiny.logits(peft_model), tiny.logits(model), atol=1e-5, rtol=1e-4)
