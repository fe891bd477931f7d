"""LoRA-SB claims: the calibrated start is the optimal rank-r approximation of full fine-tuning's first update
−η·sign(ΣG); with orthonormal B and A the gradient of R is the optimal approximation of the full gradient in the
LoRA-XS subspace (no scale tuning); the start lowers the loss and trains faster than LoRA-XS's."""
import warnings

import pytest
import torch

import lorakit
from lorakit.init import calibrate, weight_gradients
from lorakit.methods.lora_sb import LoRASBConfig
from lorakit.methods.lora_xs import LoRAXSConfig, oriented
from lorakit.testing import check_method

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
LR = 1e-3


def _config(**kw):
    return LoRASBConfig(**{"r": 8, "lora_alpha": 8, "target_modules": TARGETS, "first_step_lr": LR, **kw})


def _data(tiny):
    return [tiny.batch(100 + i) for i in range(4)]


def _calibrated(tiny, **kw):
    return calibrate(tiny.make(), _config(**kw), _data(tiny), tiny.loss)


def test_conformance():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy models train uncalibrated, and are told so
        assert check_method("lora_sb")


def test_uncalibrated_training_warns(tiny):
    model = lorakit.apply(tiny.make(), _config())
    with pytest.warns(UserWarning, match="without calibration"):
        tiny.train(model, steps=1)


def test_weight_gradients_sum_batches_and_leave_nothing(tiny):
    model = tiny.make()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    grads = weight_gradients(model, paths, _data(tiny), tiny.loss)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    reference = tiny.make()
    for p in reference.parameters():
        p.requires_grad_(False)
    weights = [reference.get_submodule(p).weight.requires_grad_(True) for p in paths]
    sum(tiny.loss(reference, b) for b in _data(tiny)).backward()
    for path, w in zip(paths, weights):
        torch.testing.assert_close(grads[path], w.grad)


@pytest.mark.parametrize("alpha", [8, 32])
def test_start_is_the_best_rank_r_first_update(tiny, alpha):
    model = _calibrated(tiny, lora_alpha=alpha)
    grads = weight_gradients(tiny.make(), list(lorakit.adapters(model)), _data(tiny), tiny.loss)
    for path, layer in lorakit.adapters(model).items():
        first = -LR * torch.sign(oriented(grads[path], layer.config))
        start = oriented(layer.delta_weight(), layer.config)
        sigma = torch.linalg.svdvals(first)
        torch.testing.assert_close((first - start).norm() ** 2, (sigma[8:] ** 2).sum(), rtol=1e-4, atol=1e-12)
        b, a = layer.lora_B.weight, layer.lora_A.weight
        torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-5, rtol=0)


def test_r_gradient_is_the_projected_full_gradient(tiny):
    model = _calibrated(tiny, lora_alpha=16)  # s = 2
    path = "model.layers.0.self_attn.q_proj"
    layer = lorakit.adapters(model)[path]
    ids = tiny.batch(7)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny.loss(model, ids).backward()
    grad_r = layer.lora_R.weight.grad
    merged = lorakit.merge(model)  # the same function, with the update folded into W
    w = merged.get_submodule(path).weight.requires_grad_(True)
    tiny.loss(merged, ids).backward()
    b, a = layer.lora_B.weight, layer.lora_A.weight
    best = torch.linalg.pinv(b) @ w.grad @ torch.linalg.pinv(a)  # argmin_X ||B X A - G||_F
    torch.testing.assert_close(grad_r, 2 * best, atol=1e-6, rtol=1e-4)


def test_start_lowers_the_loss_and_trains_faster_than_lora_xs(tiny):
    data = _data(tiny)

    def mean_loss(m):
        with torch.no_grad():
            return sum(tiny.loss(m, b).item() for b in data) / len(data)

    def fit(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=0)
        m.train()
        for step in range(12):
            tiny.loss(m, data[step % 4]).backward()
            opt.step()
            opt.zero_grad()
        return mean_loss(m.eval())

    sb = _calibrated(tiny)
    assert mean_loss(sb) < mean_loss(tiny.make()) - 0.01
    xs = lorakit.apply(tiny.make(), LoRAXSConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    assert fit(sb) < fit(xs) - 0.02


def test_calibrate_is_apply_for_methods_without_data(tiny):
    def never():
        raise AssertionError("batches were read")
        yield

    model = calibrate(tiny.make(), lorakit.LoRAConfig(r=4, target_modules=TARGETS), never(), tiny.loss)
    torch.testing.assert_close(tiny.logits(model), tiny.logits(tiny.make()))
