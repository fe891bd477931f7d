"""Training AutoLoRA's gates on the testbed's concept scenes (the command is ``lorakit diffuse-gates``, gates_cli.py).

Objective (official ``train_merger.py``): the denoising loss ||eps - eps_theta(x_t, t, text)||^2 of the model with
all its LoRAs fused through the gates, on images of a LoRA's concept captioned with their prompt, with 30% of the
prompts emptied (its ``cfg=0.3``) so the gates also serve the unconditional branch of guidance; only the gates train.
Decisions:
- data: each image shows a random non-empty subset of the fused LoRAs' concepts (drawn by ``shapes.py``, so the
  concepts appear together as well as separately; the official images each show one LoRA's concept);
- the fused set is a random subset (at least two) of the gates' LoRAs at each step, so the gates serve any subset;
- the official adds a hinge max(0, 0.5 - loss with another LoRA's prompt), tuned to FLUX's flow-matching loss
  scale; on this testbed's epsilon loss (about 0.05) a margin that size would dominate, so it is left out.
"""
from __future__ import annotations

import numpy as np
import torch

from .autolora import gated
from .compose import timesteps
from .gates import Gates
from .shapes import CONCEPTS, sample_scene

EMPTY_PROMPTS = 0.3


def scenes_for(rng: np.random.Generator, fused: list[str], n: int, empty: float = EMPTY_PROMPTS):
    """n scenes each showing a random non-empty subset of ``fused`` concepts, and their prompts (some emptied)."""
    scenes = []
    for _ in range(n):
        k = int(rng.integers(1, len(fused) + 1))
        scenes.append(sample_scene(rng, tuple(sorted(rng.choice(fused, size=k, replace=False)))))
    return scenes, [s.prompt if rng.random() >= empty else "" for s in scenes]


def gated_loss(pipe, gates: Gates, fused: list[str], scenes, prompts, gen: torch.Generator) -> torch.Tensor:
    """The denoising loss on ``scenes`` with ``fused`` LoRAs (weight 1 each) fused through ``gates``."""
    from diffusers import DDPMScheduler

    from .zoo import denoising_loss

    t_now = {}
    pipe.unet.set_adapters(list(fused), [1.0] * len(fused))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet_forward = pipe.unet.forward

    def forward(sample, timestep, *args, **kwargs):  # the timesteps of this batch, for the gates' time input
        t_now["t"] = timesteps(timestep)
        return unet_forward(sample, timestep, *args, **kwargs)

    pipe.unet.forward = forward
    try:
        with gated(pipe.unet, gates, list(fused), lambda: t_now["t"]):
            return denoising_loss(pipe, scheduler, scenes, prompts, gen)
    finally:
        del pipe.unet.forward


def train_gates(pipe, adapters: list[str], steps: int = 300, batch: int = 16, lr: float = 1e-2, seed: int = 0,
                progress=None, gates: Gates | None = None) -> tuple[Gates, list[float]]:
    """Gates for ``adapters`` (testbed concept LoRAs loaded in ``pipe``) trained for ``steps``; and the losses."""
    from .pipeline import ConceptPipeline

    if not isinstance(pipe, ConceptPipeline):
        raise ValueError(f"gates train on the testbed's concept scenes, drawn in its ConceptPipeline's pixel latents; "
                         f"{type(pipe).__name__} is another pipeline (for other networks, train Gates with your own "
                         f"denoising loss through lorakit.diffusion.autolora.gated)")
    unknown = [a for a in adapters if a not in CONCEPTS]
    if unknown:
        raise ValueError(f"gates train on the testbed's concept scenes; LoRA {unknown[0]!r} is not a testbed concept "
                         f"({', '.join(CONCEPTS)})")
    if len(adapters) < 2:
        raise ValueError(f"gated fusion needs at least two LoRAs, got {len(adapters)}")
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    gates = gates or Gates.for_denoiser(pipe.unet, adapters)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    losses = []
    bar = (progress or (lambda r: r))(range(steps))
    for _ in bar:
        fused = sorted(rng.choice(adapters, size=int(rng.integers(2, len(adapters) + 1)), replace=False))
        scenes, prompts = scenes_for(rng, fused, batch)
        loss = gated_loss(pipe, gates, fused, scenes, prompts, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
    pipe.unet.set_adapters(list(adapters), [1.0] * len(adapters))
    return gates, losses
