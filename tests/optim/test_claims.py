"""Each optimiser's defining statement, checked directly."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.optim import create


def _model(alpha=2, dropout=0.0, init=False, r=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=["0", "2"], init_lora_weights=init))


def _backward(model):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    model(x).pow(2).mean().backward()


def test_lora_plus_gives_b_the_ratio_times_the_learning_rate():
    model = _model()
    opt = create("lora_plus", model, lr=1e-3, lr_ratio=8)
    b_ids = {id(a.lora_B.weight) for a in lorakit.adapters(model).values()}
    for group in opt.param_groups:
        want = 8e-3 if all(id(p) in b_ids for p in group["params"]) else 1e-3
        assert group["lr"] == pytest.approx(want)
    assert sum(len(g["params"]) for g in opt.param_groups if g["lr"] == pytest.approx(8e-3)) == 2


def test_lora_fa_never_moves_a():
    model = _model()
    opt = create("lora_fa", model, lr=1e-2)
    a_before = {p: a.lora_A.weight.detach().clone() for p, a in lorakit.adapters(model).items()}
    for _ in range(3):
        _backward(model)
        opt.step()
        opt.zero_grad()
    for path, a in lorakit.adapters(model).items():
        assert torch.equal(a.lora_A.weight, a_before[path]) and a.lora_A.weight.grad is None
    assert any(a.lora_B.weight.abs().sum() > 0 for a in lorakit.adapters(model).values())


def test_allora_step_per_row_is_adamw_step_times_the_norm_coefficient():
    eta = 3.0
    model, ref = _model(), _model()
    opt, ref_opt = create("allora", model, lr=1e-2, eta=eta), create("adamw", ref, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((model, opt), (ref, ref_opt)):
        _backward(m)
        o.step()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        rows = before[name]
        coeff = 1 / torch.sqrt(rows.pow(2).sum(1, keepdim=True) + 1 / eta**2)
        assert torch.allclose(p - rows, (ref_params[name] - rows) * coeff, atol=1e-7), name


def test_allora_zero_row_moves_eta_times_faster_than_adamw():
    model, ref = _model(init=True), _model(init=True)  # B = 0 at initialisation
    opt, ref_opt = create("allora", model, lr=1e-3, eta=5.0), create("adamw", ref, lr=1e-3)
    for m, o in ((model, opt), (ref, ref_opt)):
        _backward(m)
        o.step()
    b, b_ref = model[0].lora_B.weight, ref[0].lora_B.weight
    assert b_ref.abs().sum() > 0 and torch.allclose(b, 5.0 * b_ref)


@pytest.mark.parametrize("alpha,dropout", [(4, 0.0), (2, 0.1)])
def test_allora_refuses_scaling_and_dropout(alpha, dropout):
    with pytest.raises(ValueError, match="lora_alpha = r .* lora_dropout = 0"):
        create("allora", _model(alpha=alpha, dropout=dropout), lr=1e-3)


def test_lora_pro_state_is_full_size_moments_per_layer():
    model = _model()
    opt = create("lora_pro", model, lr=1e-3)
    _backward(model)
    opt.step()
    # two fp32 [out, in] moments per adapted layer (8x6 and 3x8), nothing else trains
    assert opt.state_bytes() == 2 * 4 * (8 * 6 + 3 * 8) + 4 * 2


def test_lora_pro_refuses_dora():
    model = nn.Sequential(nn.Linear(6, 8))
    lorakit.apply(model, lorakit.DoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="needs plain LoRA"):
        create("lora_pro", model, lr=1e-3)
