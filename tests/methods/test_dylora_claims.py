"""DyLoRA (arXiv:2210.07558) against separately trained LoRAs of each rank.

The paper's claim: one DyLoRA run "trains LoRA blocks for a range of ranks" and then serves every rank b <= r
"without significantly compromising performance" against LoRA trained at that rank (its Table 1 puts the gap
at about a point on GLUE). Here: one DyLoRA (r = 8, the official frozen recipe: a uniformly sampled b per step,
only the b-th row/column trains) against LoRA trained from scratch at each b in {1, 2, 4, 8} on the same data,
steps, optimiser and lr. The metric is the share of the target's variance explained on held-out inputs
(R², 1 is perfect). The threshold, fixed before the runs: at every b, the one-sided 95% upper bound over three
seeds of the paired gap R²(LoRA at b) − R²(DyLoRA truncated to b) is at most 0.02 (two points, the paper's
"about a point" with a margin for the tiny task).

It does not reproduce here: at b = 2, 4 and 8 DyLoRA explains 0.1 to 0.2 less than LoRA trained at that rank.
In the frozen recipe each component trains only on the steps that sample its rank (1/8 of them), and under
AdamW a detached component still moves on Adam's stale moments after its own steps (the official code does the
same; with SGD it stays put), which also makes the rank-1 truncation unstable in longer runs.
"""
import copy

import pytest
import torch
from scipy import stats
from torch import nn

import lorakit
from lorakit.methods.dylora import DyLoRAConfig, sample_rank

D, R, STEPS, SEEDS, RANKS = 32, 8, 300, range(3), (1, 2, 4, 8)
MARGIN = 0.02


def _task(seed: int):
    """A frozen base layer and a rank-8 target update with decaying component strengths 0.8^i."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D, D))
    u, v = (torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :R] for _ in range(2))
    target = (u * torch.tensor([0.8 ** i for i in range(R)])) @ v.T
    x, x_test = torch.randn(2048, D, generator=g), torch.randn(512, D, generator=g)
    with torch.no_grad():
        return base, x, base(x) + x @ target.T, x_test, base(x_test) + x_test @ target.T, x_test @ target.T


def _train(config, base, x, y, seed: int, dynamic: bool) -> lorakit.AdapterState:
    torch.manual_seed(seed)
    model = lorakit.apply(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        if dynamic:
            sample_rank(model, g)
        idx = torch.randint(0, len(x), (64,), generator=g)
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return lorakit.AdapterState.from_model(model.eval())


def _r2(state, base, x_test, y_test, delta_test) -> float:
    with torch.no_grad():
        err = (state.load_into(copy.deepcopy(base))(x_test) - y_test).pow(2).sum()
    return 1.0 - (err / delta_test.pow(2).sum()).item()


def _gaps() -> dict[int, list[float]]:
    gaps = {b: [] for b in RANKS}
    for seed in SEEDS:
        base, x, y, x_test, y_test, delta_test = _task(seed)
        dy = _train(DyLoRAConfig(r=R, lora_alpha=R, target_modules=["0"]), base, x, y, seed, True)
        for b in RANKS:
            lora = _train(lorakit.LoRAConfig(r=b, lora_alpha=b, target_modules=["0"]), base, x, y, seed, False)
            gaps[b].append(_r2(lora, base, x_test, y_test, delta_test)
                           - _r2(lorakit.truncate(dy, b), base, x_test, y_test, delta_test))
    return gaps


@pytest.mark.slow  # about 15 s on two idle cores
@pytest.mark.xfail(strict=True, reason="does not reproduce at this scale: measured mean gaps R²(LoRA) − R²(DyLoRA) "
                   "0.015 / 0.111 / 0.207 / 0.202 at b = 1 / 2 / 4 / 8 over 3 seeds (threshold: 95% upper bound <= 0.02)")
def test_truncated_dylora_matches_lora_trained_at_each_rank():
    # Catches: a DyLoRA whose components are not ordered (truncation would keep arbitrary directions), a scale
    # other than alpha/b after truncation, or a rank sampler that starves the low ranks.
    for b, gap in _gaps().items():
        upper = stats.ttest_1samp(gap, 0.0, alternative="less").confidence_interval(0.95).high
        assert upper <= MARGIN, f"rank {b}: gap {sum(gap) / len(gap):.4f}, 95% upper bound {upper:.4f} > {MARGIN}"
