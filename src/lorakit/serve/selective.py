"""Selective classification maths for the early-exit cascade: risk-coverage curves, coverage at a target risk,
and the window-based exit rule of Xia & Bouganis, "Window-Based Early-Exit Cascades for Uncertainty
Estimation" (ICCV 2023, arXiv:2303.08010).

Operating threshold tau: on validation data, sort by confidence (maximum softmax probability, MSP), take the
number of selected samples whose risk (error rate among the selected) is closest to the target, and tau is the
confidence of the last selected sample. Window: the quantiles ``q(tau) - width`` and ``q(tau) + width`` of the
validation confidences (clamped to [0, 1]); a sample exits at stage 1 when its confidence lies outside it.

Decisions and deviations (official code: Guoxoug/window-early-exit, ``utils/eval_utils.py::get_threshold``,
``cascade_results.py``):
- The official search skips the 500 most confident of 50,000 validation samples (1%) because risk at tiny
  coverage is noisy; here ``skip`` defaults to the same fraction, ceil(n / 100).
- The official threshold is the score one position past the chosen cut (an off-by-one); here tau is the score
  of the last selected sample, so ``confidence >= tau`` selects exactly that many (ties aside).
- Where several cuts are equally close to the target risk (e.g. a classifier never wrong on validation), the one
  with the largest coverage wins; the official ``argmin`` takes the smallest.
- ``q(tau)`` is the fraction of validation confidences <= tau (scipy's ``percentileofscore`` averages the
  strict and weak fractions; the two differ only by ties at tau).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """The cascade's operating point: tau, and the confidence window [low, high] around it that goes on."""

    tau: float
    low: float
    high: float
    risk: float = 0.05
    width: float = 0.1

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"Window: low ({self.low}) must be <= high ({self.high})")

    def inside(self, confidence: torch.Tensor) -> torch.Tensor:
        """True where a sample goes on to the later members (low <= confidence <= high)."""
        return (confidence >= self.low) & (confidence <= self.high)

    def to_dict(self) -> dict:
        return {"tau": self.tau, "low": self.low, "high": self.high, "risk": self.risk, "width": self.width}


def msp(probs: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of each row (float64)."""
    return probs.to(torch.float64).max(dim=-1).values


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(risk, coverage, threshold) of selecting the j most confident samples, j = 1..n."""
    if confidence.numel() == 0 or confidence.shape != correct.shape:
        raise ValueError(f"risk_coverage needs matching non-empty tensors, found {tuple(confidence.shape)} and "
                         f"{tuple(correct.shape)}")
    order = torch.argsort(confidence, descending=True, stable=True)
    errors = (~correct.bool())[order].to(torch.float64).cumsum(0)
    selected = torch.arange(1, confidence.numel() + 1, dtype=torch.float64, device=confidence.device)
    return errors / selected, selected / confidence.numel(), confidence[order]


def _cut(risk: torch.Tensor, target: float, skip: int | None) -> int:
    n = risk.numel()
    skip = min(n - 1, math.ceil(n / 100) if skip is None else skip)
    gap = (risk[skip:] - target).abs().flip(0)  # flipped: a tie goes to the larger coverage
    return n - 1 - int(torch.argmin(gap))


def coverage_at_risk(confidence: torch.Tensor, correct: torch.Tensor, risk: float = 0.05,
                     skip: int | None = None) -> tuple[float, float]:
    """(coverage, achieved risk) where the risk-coverage curve comes closest to ``risk`` (the paper's cov@5)."""
    r, c, _ = risk_coverage(confidence, correct)
    j = _cut(r, risk, skip)
    return float(c[j]), float(r[j])


def fit_window(confidence: torch.Tensor, correct: torch.Tensor, risk: float = 0.05, width: float = 0.1,
               skip: int | None = None) -> Window:
    """The operating threshold for ``risk`` and the window of ``width`` quantiles either side, from validation data."""
    if not 0 < risk < 1 or not 0 <= width <= 1:
        raise ValueError(f"fit_window: risk must be in (0, 1) and width in [0, 1], found risk={risk}, width={width}")
    confidence = confidence.to(torch.float64)
    r, _, thresholds = risk_coverage(confidence, correct)
    tau = float(thresholds[_cut(r, risk, skip)])
    q = float((confidence <= tau).to(torch.float64).mean())
    bounds = torch.tensor([max(q - width, 0.0), min(q + width, 1.0)], dtype=torch.float64, device=confidence.device)
    low, high = torch.quantile(confidence, bounds).tolist()
    return Window(tau=tau, low=low, high=high, risk=risk, width=width)
