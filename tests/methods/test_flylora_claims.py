"""FlyLoRA (arXiv:2510.08396), the claims of its abstract at test scale.

1. "an implicit router that unifies expert routing and down-projection, where a frozen sparse random projection
   matrix replaces the traditional dense trainable version": no router parameters and no trainable A, so the
   trainable count is r·out per layer, against LoRA's r·(in + out) at the same rank.
2. "inherently mitigating inter-task interference due to the orthogonality property of random matrices": two
   tasks trained separately (each its own seed, so its own random A) and merged by averaging every adapter
   tensor, as the authors' ``fast_lora_average``. Setting, fixed before the runs: one 64 -> 64 layer, inputs
   N(0, I), each task a random rank-4 target update; FlyLoRA r = 16, top_k = 4 against LoRA r = 4 (the same
   active rank per token), same AdamW steps and lr. Metric: each task's share of its update explained by the
   merged adapter (R² on held-out inputs). Threshold: the one-sided 95% lower bound over five seeds of the
   paired difference R²(FlyLoRA merged) − R²(LoRA merged), averaged over the two tasks, is above 0.
   It does not reproduce: a frozen random A of rank 16 on a 64-wide input with 4 of 16 ranks active fits one
   task to R² 0.12 where LoRA fits it exactly, and merging keeps about a quarter of either (0.03 vs 0.25), so
   the merged FlyLoRA is far behind; the interference itself (the share kept) is about equal.
"""
import copy

import pytest
import torch
from scipy import stats
from torch import nn

import lorakit
from lorakit.methods.flylora import FlyLoRAConfig

from target_fit import fit_to_target

D, STEPS, LR, SEEDS = 64, 300, 1e-2, range(5)


def test_no_router_and_no_trainable_a():
    # Catches: a trainable A or a separate router (the count would grow by r·in or by a gate's size).
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))
    lorakit.apply(model, FlyLoRAConfig(r=8, top_k=2, target_modules=["0", "2"]))
    counts = {n: p.numel() for n, p in lorakit.trainable_parameters(model).items()}
    assert sum(counts.values()) == 8 * (32 + 16), counts
    lora = lorakit.apply(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)),
                         lorakit.LoRAConfig(r=8, target_modules=["0", "2"]))
    assert sum(p.numel() for p in lorakit.trainable_parameters(lora).values()) == 8 * (48 + 32 + 32 + 16)


def _averaged(states: list) -> lorakit.AdapterState:
    tensors = {p: {n: sum(s.tensors[p][n] for s in states) / len(states) for n in t} for p, t in states[0].tensors.items()}
    return lorakit.AdapterState(states[0].config, tensors)


def _merged_r2(config, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D, D)).requires_grad_(False)
    targets = [torch.randn(D, 4, generator=g) @ torch.randn(4, D, generator=g) / D ** 0.5 for _ in range(2)]
    merged = _averaged([fit_to_target(base, config, t, 2 * seed + i, STEPS, LR) for i, t in enumerate(targets)])
    model = merged.load_into(copy.deepcopy(base)).eval()
    x = torch.randn(512, D, generator=g)
    with torch.no_grad():
        return sum(1 - ((model(x) - base(x) - x @ t.T).pow(2).sum() / (x @ t.T).pow(2).sum()).item()
                   for t in targets) / len(targets)


@pytest.mark.slow  # about 20 s on two idle cores
@pytest.mark.xfail(strict=True, reason="does not reproduce at this scale: measured merged R² FlyLoRA 0.02-0.04 vs "
                   "LoRA 0.25-0.28 over 5 seeds; alone, FlyLoRA fits a task to R² 0.12, LoRA to 1.00")
def test_merged_flylora_keeps_more_of_each_task_than_merged_lora():
    # Catches: a FlyLoRA whose A is trained or shared across seeds (the merged A's would stop being independent),
    # or one whose merge loses the routing it was trained with.
    fly = FlyLoRAConfig(r=16, top_k=4, lora_alpha=32, target_modules=["0"])
    lora = lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["0"])
    diffs = [_merged_r2(fly, seed) - _merged_r2(lora, seed) for seed in SEEDS]
    low = stats.ttest_1samp(diffs, 0.0, alternative="greater").confidence_interval(0.95).low
    assert low > 0, f"R² differences {[round(d, 3) for d in diffs]}; 95% lower bound {low:.3f} <= 0"
