"""Helpers for the diffusion tests: a tiny untrained testbed pipeline and LoRAs with non-zero factors."""
from __future__ import annotations

import torch


def make_lora(pipe, name: str, seed: int, targets=None):
    """Add adapter ``name`` with random (non-zero) A and B to the pipeline's UNet."""
    from peft import LoraConfig

    from lorakit.diffusion.pipeline import LORA_TARGETS

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                     target_modules=targets or LORA_TARGETS), adapter_name=name)
    with torch.no_grad():  # keep the updates small enough for the outputs to stay in a sane range
        for n, p in pipe.unet.named_parameters():
            if f".{name}." in n:
                p.mul_(0.3)


def fresh_pipeline():
    from lorakit.diffusion.pipeline import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(batch: int = 2, seed: int = 0):
    """A denoiser input: latents, a timestep, text states."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 12, 16, 16, generator=g), torch.tensor(500), torch.randn(batch, 8, 32, generator=g)
