"""LoRA-GA (arXiv:2407.05000), its two claims at their stated strength.

1. Section 3.2: the initialisation "aligns the gradients of low-rank matrix product with those of full
   fine-tuning at the first step". With A = c·V[:r]ᵀ and B = c·U[:, r:2r] the first-order change of W in one
   SGD step is −η (s (g_B A + B g_A)) = −η s² c² (B BᵀG + G AᵀA) = −η s² c² G_2r, with G_2r the best rank-2r
   approximation of the full gradient G. Threshold: relative error below 1e-5 per layer against that
   expression built from the singular pairs of the randomised SVD that both the official code and lorakit use
   (svd_lowrank, q = 4r, 4 power iterations); this pins the index sets and the factor c. How close those pairs
   are to the exact SVD's is svd_lowrank's accuracy, not the claim: a first threshold of 1e-3 against the
   exact G_2r failed at 1.8e-3 (q_proj), a second of 1e-2 at 1.6e-2 (up_proj, close singular values near 2r),
   so that distance is not asserted.
2. Abstract: "significantly faster than vanilla LoRA", "up to 2-4 times convergence speed improvement".
   Measured as the steps each needs to reach one loss level on a small deterministic task, same optimiser
   (AdamW) and lr. The level is fixed before the runs as the loss default LoRA reaches at the end of its
   budget (running mean of 5 steps, at step 60). Over five seeds (they draw the data and LoRA's random A),
   the one-sided 95% lower bound of the geometric-mean speed-up must exceed 1 (faster) and, for the low end
   of "2-4x", reach 2. The second does not reproduce here: the speed-ups are about 2x, not reliably more.
"""
import copy

import pytest
import torch

import lorakit
from lorakit.init.calibration import Calibration, accumulate_gradients
from lorakit.init.lora_ga import _lowrank

from convergence import log_speedups, lower_bound
from init_helpers import lm_batches, lorakit_model

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
R, ALPHA, GAMMA = 4, 8, 16
SEEDS = range(5)


def test_first_order_step_is_the_best_rank_2r_approximation_of_the_full_gradient(base):
    # Catches: A and B scaled differently (PEFT's port multiplies B by S: B BᵀG then weighs σ_i³), overlapping
    # index sets for A and B (2·G_r instead of G_2r), a wrong stable factor, or a gradient taken elsewhere.
    batches = lm_batches(2, 2, 12)
    full = copy.deepcopy(base)
    grads = accumulate_gradients(full, {p: m for p, m in full.named_modules() if p.endswith(TARGETS)},
                                 Calibration.of(batches))
    model = lorakit_model(base, "lora_ga", r=R, alpha=ALPHA, targets=TARGETS, batches=batches)
    model.train()
    (sum(model(**b).loss for b in batches) / len(batches)).backward()
    s = ALPHA / R
    for path, a in lorakit.adapters(model).items():
        A, B = a.lora_A.weight, a.lora_B.weight
        first_order = -s * (a.lora_B.weight.grad @ A + B @ a.lora_A.weight.grad).detach()  # per unit lr
        g = grads[path]
        c2 = g.shape[0] ** 0.5 / GAMMA
        u, _, v = _lowrank(g, min(4 * R, *g.shape))
        b, a = u[:, R: 2 * R], v[:, :R]
        randomised = b @ b.T @ g + g @ a @ a.T  # B BᵀG + G AᵀA / c²: G_2r when the singular pairs are exact
        expected = -(s ** 2) * c2 * randomised
        rel = ((first_order - expected).norm() / expected.norm()).item()
        assert rel < 1e-5, (path, rel)


_SPEEDUPS: list = []


def _lower_bound(base) -> tuple[float, list[float]]:
    if not _SPEEDUPS:
        _SPEEDUPS.extend(log_speedups(base, "lora_ga", TARGETS, SEEDS))
    return lower_bound(_SPEEDUPS)


@pytest.mark.slow  # about 20 s of CPU, shared with the next test
def test_converges_faster_than_lora(base):
    # Catches: an initialisation that does not follow the gradient (random or PEFT-default speed), or an offset
    # that changes the function at step 0 (the early losses would jump instead of falling).
    low, speedups = _lower_bound(base)
    assert low > 1, f"speed-ups {speedups}; 95% lower bound {low:.2f}x <= 1x"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="does not reproduce at this scale: measured speed-ups 1.69, 2.15, 1.88, "
                   "2.03, 2.30x over 5 seeds, 95% lower bound 1.78x (threshold: 2x)")
def test_converges_at_least_twice_as_fast_as_lora(base):
    low, speedups = _lower_bound(base)
    assert low >= 2, f"speed-ups {speedups}; 95% lower bound {low:.2f}x < 2x"
