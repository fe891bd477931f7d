"""LoRA Merge: every LoRA active at once with its weight, the weighted sum of their updates.

Paper: "Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv 2402.16843), its baseline "LoRA Merge".
Update rule: W = W0 + sum_i w_i * s_i * B_i A_i at every step, i.e. diffusers' ``set_adapters(names, weights)``.
Deviations: none; one denoiser evaluation per step.
"""
from __future__ import annotations

from .compose import COMPOSERS, Composer


@COMPOSERS.register()
class Merge(Composer):
    """All LoRAs active with their weights at every step."""

    name = "merge"

    def predict(self, step, run):
        return run(self.adapters, self.weights)
