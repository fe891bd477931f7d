"""LoRA-LEGO (arXiv:2409.16167): "our method outperforms existing approaches in LoRA merging", at test scale.

Setting, fixed before the runs: one 64 -> 64 layer, inputs N(0, I); three tasks whose rank-4 target updates
share two rank-1 directions (a common skill, equal in all three) and own two random ones; a LoRA r = 4 trained
on each (AdamW, same steps and lr). Merged into one adapter: LEGO at k = r = 4 (the paper's setting, dual
reweighting on) against the existing approaches that lorakit offers on the updates: the average of the three
updates (``linear``, exact, rank 12) and that average re-factored to rank 4 (``svd``, LEGO's rank). Metric:
the mean over the three tasks of the share of each task's update the merged adapter explains on held-out
inputs (R²). Threshold: the one-sided 95% lower bound over five seeds of R²(LEGO) − R²(best of the two) is
above 0. It does not reproduce: trained LoRAs carry the shared directions rotated inside each rank-4
subspace (B A = B M M⁻¹ A for any invertible M), so the units of different tasks do not line up, and
centroids of unrelated units keep about half of what the plain average keeps. The paper's structural properties (units commute, stacking is summing) are in test_merge_lego.py.
"""
import pytest
import torch
from scipy import stats
from torch import nn

import lorakit
from lorakit.merging import combine

from target_fit import fit_to_target

D, R, STEPS, LR, SEEDS = 64, 4, 300, 1e-2, range(5)


def _targets(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared_b, shared_a = torch.randn(D, 2, generator=g), torch.randn(2, D, generator=g)
    return [(shared_b @ shared_a + torch.randn(D, 2, generator=g) @ torch.randn(2, D, generator=g)) / D ** 0.5
            for _ in range(3)]


def _scores(seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D, D)).requires_grad_(False)
    targets = _targets(seed)
    config = lorakit.LoRAConfig(r=R, lora_alpha=2 * R, target_modules=["0"])
    states = [fit_to_target(base, config, t, 3 * seed + i, STEPS, LR) for i, t in enumerate(targets)]
    merged = {"lego": combine(states, "lego", rank=R, seed=seed), "linear": combine(states, "linear"),
              "svd": combine(states, "svd", [1 / 3] * 3, rank=R)}
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(seed + 77))
    out = {}
    for name, state in merged.items():
        delta = state.delta("0")
        out[name] = sum(1 - ((x @ (delta - t).T).pow(2).sum() / (x @ t.T).pow(2).sum()).item() for t in targets) / 3
    return out


@pytest.mark.slow  # about 15 s on two idle cores
@pytest.mark.xfail(strict=True, reason="does not reproduce at this scale: measured mean R² LEGO 0.30 (0.18-0.39), "
                   "average of the updates 0.64, its rank-4 SVD 0.56, over 5 seeds (threshold: lower bound > 0)")
def test_lego_merges_better_than_the_average_of_updates():
    # Catches: clustering that mixes the shared units with the task-specific ones, or reweighting that over- or
    # under-scales the merged update (either loses R² against the plain average).
    scores = [_scores(seed) for seed in SEEDS]
    diffs = [s["lego"] - max(s["linear"], s["svd"]) for s in scores]
    low = stats.ttest_1samp(diffs, 0.0, alternative="greater").confidence_interval(0.95).low
    assert low > 0, f"R² per seed {[{k: round(v, 3) for k, v in s.items()} for s in scores]}; 95% lower bound " \
                    f"of LEGO minus the best other {low:.3f} <= 0"
