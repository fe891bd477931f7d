"""LoRA Composite: at every step, the noise predictions under each LoRA alone, averaged.

Paper: "Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv 2402.16843).
Update rule: eps = (1/N) sum_i eps(x_t, t, c; LoRA i at weight w_i), taken for the unconditional and the text
branch alike, then guidance: eps_u_bar + g (eps_t_bar - eps_u_bar) (official ``pipeline_0.26.3.py``).
Deviations: none; the averaging happens on the pipeline's batched [uncond, text] prediction, which equals averaging
each branch first because guidance is linear. Costs N denoiser evaluations per step.
"""
from __future__ import annotations

import torch

from .compose import COMPOSERS, Composer


@COMPOSERS.register()
class Composite(Composer):
    """The mean of the per-LoRA noise predictions at every step."""

    name = "composite"

    def predict(self, step, run):
        return torch.stack([run([a], [w]) for a, w in zip(self.adapters, self.weights)]).mean(0)
