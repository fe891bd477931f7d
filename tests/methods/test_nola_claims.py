"""NOLA (arXiv:2310.02556), its two abstract claims at their stated strength.

1. "decouple the number of trainable parameters from both the choice of rank and the network architecture":
   the trainable count is num_basis_A + num_basis_B per adapted layer, whatever r and the layer's shape.
2. "we can halve the parameters in larger models compared to LoRA with rank one, without sacrificing
   performance". At test scale, one layer (32 -> 32) must learn a full-rank update whose singular values fall
   as 1/i (a generic decaying spectrum, fixed before the runs); NOLA with k = l = (m + n)/4 (half of rank-1
   LoRA's m + n parameters) against rank-1 LoRA, same data, steps, AdamW and lr (5e-3, the paper's GPT-2 lr).
   Metric: share of the update's output variance explained on held-out inputs (R²). Threshold: the one-sided
   95% upper bound over five seeds of R²(LoRA r=1) − R²(NOLA) is at most 0.02. It does not reproduce: at
   half the parameters NOLA explains 0.06 of the variance, rank-1 LoRA 0.62 (its optimum, 1/Σ1/i²), where the layer is small and the
   update's leading direction carries most of the signal (the paper's claim is for large models).
"""
import copy

import pytest
import torch
from scipy import stats
from torch import nn

import lorakit
from lorakit.methods.nola import NOLAConfig

D, STEPS, LR, SEEDS = 32, 400, 5e-3, range(5)


@pytest.mark.parametrize("r", [1, 8, 32])
@pytest.mark.parametrize("width", [16, 128])
def test_trainable_count_is_the_number_of_bases_for_any_rank_and_shape(r, width):
    # Catches: coefficients per rank or per row (the count would grow with r or the width), or a trainable A0.
    model = nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 8))
    lorakit.apply(model, NOLAConfig(r=r, num_basis_A=40, num_basis_B=24, target_modules=["0", "2"]))
    assert sum(p.numel() for p in lorakit.trainable_parameters(model).values()) == 2 * (40 + 24)


def _task(seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D, D))
    u, v = (torch.linalg.qr(torch.randn(D, D, generator=g))[0] for _ in range(2))
    update = (u / torch.arange(1, D + 1)) @ v.T
    x, x_test = torch.randn(2048, D, generator=g), torch.randn(512, D, generator=g)
    with torch.no_grad():
        return base, x, base(x) + x @ update.T, x_test, x_test @ update.T


def _r2(config, seed: int) -> float:
    base, x, y, x_test, delta_test = _task(seed)
    torch.manual_seed(seed)
    model = lorakit.apply(copy.deepcopy(base), config)
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (64,), generator=g)
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        err = (model(x_test) - base(x_test) - delta_test).pow(2).sum()
    return 1 - (err / delta_test.pow(2).sum()).item()


@pytest.mark.slow  # about 15 s on two idle cores
@pytest.mark.xfail(strict=True, reason="does not reproduce at this scale: measured R² NOLA 0.06 vs rank-1 LoRA "
                   "0.62 (mean over 5 seeds; threshold: upper bound of the gap <= 0.02)")
def test_half_the_parameters_of_rank_one_lora_without_loss():
    # Catches: NOLA bases or coefficients that do not reach the update (R² near 0), or a NOLA that needs far more
    # than half of rank-1 LoRA's parameters for the same fit.
    half = (D + D) // 4
    nola = NOLAConfig(r=8, lora_alpha=8, num_basis_A=half, num_basis_B=half, target_modules=["0"])
    lora = lorakit.LoRAConfig(r=1, lora_alpha=1, target_modules=["0"])
    gaps = [_r2(lora, seed) - _r2(nola, seed) for seed in SEEDS]
    upper = stats.ttest_1samp(gaps, 0.0, alternative="less").confidence_interval(0.95).high
    assert upper <= 0.02, f"gaps {[round(g, 3) for g in gaps]}; 95% upper bound {upper:.3f} > 0.02"
