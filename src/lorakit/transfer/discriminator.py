"""The discriminator that filters synthetic inputs (Trans-LoRA's steps 2-3): trained to tell real inputs from
synthetic ones; synthetic inputs it judges real-like are kept.

Features are the source model's (with its adapter) last hidden states, mean-pooled over tokens and L2-normalised,
computed in the same forward pass that gives the teacher's soft labels. The classifier is an L2-regularised
logistic regression with the two classes weighted equally (real inputs are few), fitted by L-BFGS.

Cross-fitting: the candidates are split into `folds`; each fold is scored by a discriminator trained on the real
inputs and the other folds' candidates, so no candidate is judged by a model that saw it labelled synthetic.
By default the `keep_fraction` candidates with the highest P(real) pass (rank-based rejection). Deviation: the
paper keeps what its discriminator classifies as real (P >= 0.5, available here as `threshold=0.5`). With five
real examples against hundreds of synthetic ones, every candidate resembling the pool is labelled synthetic in the
other folds, so an absolute cut rejects real inputs too (measured: real tweets held out among the candidates got
P ~ 0.01-0.4 depending on the L2 weight); the ranking still puts them above off-distribution inputs.

Deviation from the paper: its discriminator is a LoRA on the source LLM, fine-tuned when the source adapter is
trained on the full (then still available) training set. Here only the seed examples are real (plus any real,
unlabeled inputs the caller passes as `real`): a linear probe on frozen features, not a LoRA, since a LoRA fitted to
five positives separates anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Judgement:
    """Probabilities of being real for each candidate, and which ones pass."""

    p_real: torch.Tensor
    keep: torch.Tensor  # bool, one per candidate


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b) of a logistic regression on x (n, d) and y in {0, 1} with balanced class weights and an L2 penalty."""
    x, y = x.double(), y.double()
    n_pos = y.sum().clamp(min=1)
    n_neg = (1 - y).sum().clamp(min=1)
    weight = torch.where(y > 0, 0.5 / n_pos, 0.5 / n_neg)  # each class carries half of the loss
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def held_out_scores(real: torch.Tensor, candidates: torch.Tensor, folds: int = 5, l2: float = 1.0,
                    seed: int = 0) -> torch.Tensor:
    """P(real) of every candidate from a discriminator trained on `real` and the other folds' candidates."""
    folds = max(2, min(folds, len(candidates)))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    p_real = torch.empty(len(candidates), dtype=torch.float64)
    for k in range(folds):
        held = order[k::folds]
        train = torch.ones(len(candidates), dtype=torch.bool)
        train[held] = False
        x = torch.cat([real, candidates[train]])
        y = torch.cat([torch.ones(len(real)), torch.zeros(int(train.sum()))])
        w, b = fit_logistic(x, y, l2)
        p_real[held] = torch.sigmoid(candidates[held].double() @ w + b)
    return p_real.float()


def judge(real: torch.Tensor, candidates: torch.Tensor, *, l2: float = 1.0, folds: int = 5,
          keep_fraction: float = 0.5, threshold: float | None = None, seed: int = 0) -> Judgement:
    """Cross-fitted judgement of `candidates` (m, d) against `real` (n, d) features: the `keep_fraction` most
    real-like candidates pass, or, with `threshold`, those whose P(real) is at least that (the paper's rule)."""
    if len(real) < 2:
        raise ValueError(f"the discriminator needs at least 2 real examples, got {len(real)}")
    if len(candidates) < 2:
        raise ValueError(f"the discriminator needs at least 2 synthetic candidates, got {len(candidates)}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    p_real = held_out_scores(real, candidates, folds, l2, seed)
    if threshold is None:
        order = torch.argsort(p_real, descending=True, stable=True)
        keep = torch.zeros(len(candidates), dtype=torch.bool)
        keep[order[: max(1, round(keep_fraction * len(candidates)))]] = True
    else:
        keep = p_real >= threshold
    return Judgement(p_real, keep)
