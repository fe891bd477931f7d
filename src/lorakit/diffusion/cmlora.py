"""CMLoRA: LoRAs ordered by the frequency content of their effect, one dominant at a time, with non-uniform caching.

Paper: "Cached Multi-LoRA Composition for Multi-Concept Image Generation" (Zou et al., ICLR 2025, arXiv 2502.04923);
official code Yqcca/CMLoRA (``pipeline_async.py``, ``pipeline_online.py``).
Update rule: LoRAs are sorted high-frequency first; at step k the dominant LoRA is order[(k // every) % N] and
eps = sum_i c_i eps_i with c_dom = d / (d + N - 1), c_other = 1 / (d + N - 1), d = N - 0.5 (the official
``dom_lora_coeff``; the official loop decrements d later but its weights are computed once before the loop, so they
stay fixed, as here). The dominant LoRA is evaluated at every step; the others only at the refresh steps of the
official non-uniform schedule (every 2nd step in the first 37.5% of steps, every 3rd up to 87.5%, every 2nd after),
their last prediction being reused in between. ``every`` defaults to round(T * 20 / 220), the official change of
dominant every 20 of 220 steps.
Deviations:
- ordering: the official code sorts by a fixed table of LoRA categories (character, clothing, style and object
  before background) found by its offline Fourier analysis; here each LoRA's high-frequency share is measured at
  the first step of each generation, as the share of the spectral energy of eps_i - eps_base (one extra evaluation,
  adapters off) above half the Nyquist radius of the denoiser's input grid.
- caching: the official code caches deep UNet features of non-dominant LoRAs (DeepCache-style, a modified UNet
  forward) and refreshes one LoRA's cache per refresh step; here the whole noise prediction of every non-dominant
  LoRA is cached and all of them are refreshed at refresh steps, which works on any denoiser without changing it.
  ``cache=False`` evaluates every LoRA at every step (the uncached cost). The cache is kept per denoiser call
  within a step, so a pipeline that runs its guidance branches as separate calls gets each branch's own cache.
"""
from __future__ import annotations

import torch

from .compose import COMPOSERS, Composer


def high_frequency_share(delta: torch.Tensor) -> float:
    """Share of the 2-D spectral energy of ``delta`` (..., H, W) above half the Nyquist radius."""
    power = torch.fft.fft2(delta.float()).abs().square().sum(dim=tuple(range(delta.dim() - 2)))
    fy = torch.fft.fftfreq(delta.shape[-2], device=delta.device).abs()[:, None]
    fx = torch.fft.fftfreq(delta.shape[-1], device=delta.device).abs()[None, :]
    high = (fy.square() + fx.square()).sqrt() > 0.25  # Nyquist radius is 0.5 cycles per sample
    return float(power[high].sum() / power.sum().clamp_min(1e-20))


def refresh_steps(total: int) -> set[int]:
    """The official non-uniform schedule of steps at which cached predictions are recomputed."""
    a, b = int(0.375 * total), int(0.875 * total)
    return set(range(0, a, 2)) | set(range(a, b, 3)) | set(range(b, total, 2))


@COMPOSERS.register()
class CMLoRA(Composer):
    """Frequency-ordered dominant LoRA, weighted composite, non-uniform caching of the other LoRAs."""

    name = "cmlora"
    cache: bool = True
    every: int = 0  # 0: round(T * 20 / 220), at least 1

    def reset(self, total_steps):
        super().reset(total_steps)
        self.order: list[int] = []
        self.cached: dict[int, torch.Tensor] = {}
        self.refresh = refresh_steps(total_steps)
        self.period = self.every or max(1, round(total_steps * 20 / 220))
        n = len(self.adapters)
        d = n - 0.5
        self.shares = (d / (d + n - 1), 1 / (d + n - 1))

    def predict(self, step, run):
        n = len(self.adapters)
        fresh = set()
        if not self.order:
            base = run([], [])
            if base.dim() < 4:
                raise ValueError(f"cmlora orders LoRAs by the 2-D spectrum of their effect on the prediction; this "
                                 f"denoiser predicts shape {tuple(base.shape)}, packed tokens without an image grid "
                                 f"(e.g. Flux)")
            for i in range(n):
                self.cached[self.slot, i] = run([self.adapters[i]], [self.weights[i]])
                fresh.add(i)
            scores = [high_frequency_share(self.cached[self.slot, i] - base) for i in range(n)]
            self.order = sorted(range(n), key=lambda i: -scores[i])
        dominant = self.order[(step // self.period) % n]
        for i in range(n):  # the cache is kept per call slot, so separate guidance calls never share predictions
            stale = i == dominant or not self.cache or step in self.refresh or (self.slot, i) not in self.cached
            if i not in fresh and stale:
                self.cached[self.slot, i] = run([self.adapters[i]], [self.weights[i]])
        dom, other = self.shares
        return sum((dom if i == dominant else other) * self.cached[self.slot, i] for i in range(n))
