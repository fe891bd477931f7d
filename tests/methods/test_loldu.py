"""LoLDU claims: W = P L D U exactly; the model starts at W; only the r diagonal values train (r per module,
r + 1 with the scale); the update is the official parametrisation W_res + σ P L_r diag(z) U_r."""
import pytest
import torch

import lorakit
from lorakit.methods.loldu import LoLDUConfig, ldu
from lorakit.methods.lora_xs import oriented
from lorakit.testing import ToyLinear, check_method

TARGETS = ["k_proj", "o_proj", "gate_proj", "down_proj"]


def _config(**kw):
    return LoLDUConfig(**{"r": 8, "lora_alpha": 4, "target_modules": TARGETS, **kw})


def test_conformance():
    assert check_method("loldu")
    assert check_method("loldu", config=LoLDUConfig(r=4, target_modules=ToyLinear.targets, train_scale=True), toys=[ToyLinear])


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_ldu_reconstructs_the_weight(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    k = min(shape)
    lower, d, upper = ldu(w, k)
    torch.testing.assert_close(lower @ torch.diag(d) @ upper, w, atol=1e-5, rtol=1e-4)
    p, _, _ = torch.linalg.lu(w)
    unpermuted = p.T @ lower  # L: unit lower triangular
    torch.testing.assert_close(unpermuted, torch.tril(unpermuted))
    torch.testing.assert_close(torch.diagonal(unpermuted), torch.ones(k))
    torch.testing.assert_close(upper[:, :k], torch.triu(upper[:, :k]))
    torch.testing.assert_close(torch.diagonal(upper), torch.ones(k))


@pytest.mark.parametrize("train_scale", [False, True])
def test_starts_at_w_and_trains_only_the_diagonal(tiny, train_scale):
    model = lorakit.apply(tiny.make(), _config(train_scale=train_scale))
    assert torch.equal(tiny.logits(model), tiny.logits(tiny.make()))
    trainable = lorakit.trainable_parameters(model)
    assert sum(p.numel() for p in trainable.values()) == 8 * (8 + train_scale)
    assert {n.rsplit(".", 1)[-1] for n in trainable} == ({"loldu_z", "loldu_scale"} if train_scale else {"loldu_z"})


def test_update_is_the_official_parametrisation(tiny):
    """W_res + σ P L_r diag(z) U_r with W_res = W − σ₀ P L_r diag(D_r) U_r, built with the dense P."""
    model = tiny.train(lorakit.apply(tiny.make(), _config(train_scale=True)), steps=3)
    for path, layer in lorakit.adapters(model).items():
        w = oriented(layer.base_layer.weight, layer.config).detach()
        p, lower, upper = torch.linalg.lu(w)
        d = torch.diagonal(upper)
        lr, dr, ur = lower[:, :8], d[:8], (upper / d[:, None])[:8]
        sigma0 = 4 / 8
        residual = w - sigma0 * p @ lr @ torch.diag(dr) @ ur
        z, sigma = layer.loldu_z.detach(), layer.loldu_scale.detach()
        assert not torch.allclose(z, dr) and sigma != sigma0, path
        official = residual + sigma * p @ lr @ torch.diag(z) @ ur
        torch.testing.assert_close(w + oriented(layer.delta_weight(), layer.config), official, atol=1e-5, rtol=1e-4)
