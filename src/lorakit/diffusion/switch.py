"""LoRA Switch: one LoRA active at a time, the next one every ``every`` denoising steps, cycling.

Paper: "Multi-LoRA Composition for Image Generation" (Zhong et al., arXiv 2402.16843).
Update rule: at step k only LoRA i(k) is active (weight w_i), i(k) = (max(k - 1, 0) // every) mod N: the official
callback (``callbacks.py``) switches at the end of step k when k > 0 and k % every == 0, so the first LoRA holds
steps 0..every and each later one ``every`` steps. Default every = 5, the official switch_step.
Deviations: the switch is made when the denoiser is called rather than in ``callback_on_step_end``; the steps at
which each LoRA is active are the same.
"""
from __future__ import annotations

from .compose import COMPOSERS, Composer


@COMPOSERS.register()
class Switch(Composer):
    """Exactly one LoRA per step, cycling every ``every`` steps."""

    name = "switch"
    every: int = 5

    def active(self, step: int) -> int:
        """Index of the LoRA active at ``step``."""
        return (max(step - 1, 0) // self.every) % len(self.adapters)

    def predict(self, step, run):
        i = self.active(step)
        return run([self.adapters[i]], [self.weights[i]])
