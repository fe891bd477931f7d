"""Latent-moving methods under Euler-type schedulers: the update is made on the denoiser's input and mapped back to
the scheduler's latent by the scale_model_input factor, checked against a hand computation at one step."""
from __future__ import annotations

import pytest
import torch
from test_diffusion_dit import make_loras

from lorakit.diffusion import compose
from lorakit.diffusion.tiny import build_sd3, generate_kwargs

PROMPT = "yellow cross left"


def trace(composer):
    """Record (pipeline latent, denoiser-input latent before and after the move, latent stepped from) per step."""
    seen = []
    original = composer.update_latents

    def update_latents(latents, timestep):
        pending = composer.pending
        out = original(latents, timestep)
        if pending is not None:
            seen.append((latents.clone(), pending[0].clone(), pending[1].clone(), out.clone()))
        return out

    composer.update_latents = update_latents
    return seen


@pytest.mark.parametrize("kind", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("method, options", [("clora", {"refine_iters": 0}),
                                             ("lora_composer", {"layout": [(0, 0, 16, 32), (16, 0, 32, 32)]})])
def test_euler_moves_the_denoisers_input_and_steps_from_it_rescaled(loaded, kind, method, options):
    import diffusers

    pipe, names = loaded
    # Stable Diffusion's schedule (the testbed's cosine one puts sigma_max near 1e4)
    pipe.scheduler = getattr(diffusers, kind).from_config(pipe.scheduler.config, beta_schedule="scaled_linear")
    torch.manual_seed(0)  # Euler ancestral draws its noise from the global generator here
    with compose(pipe, names, method, prompt=PROMPT, **options) as stats:
        moves = trace(stats.composer)
        images = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
    assert torch.isfinite(images).all() and moves
    sigmas = pipe.scheduler.sigmas
    for step, (latents, before, after, stepped) in enumerate(moves):
        c = float((sigmas[step] ** 2 + 1) ** 0.5)  # Euler's model input is x / sqrt(sigma^2 + 1)
        assert c > 1.1  # the scaling is away from 1 at these steps (about 14.6 at the first), so a missing factor shows
        torch.testing.assert_close(before, latents / c, rtol=1e-6, atol=1e-6)
        assert (after - before).abs().max() > 1e-4  # the method did move the latent
        torch.testing.assert_close(stepped, latents + (after - before) * c, rtol=1e-5, atol=1e-5)


def test_flow_matching_moves_the_latent_itself(tmp_path):
    pipe = build_sd3()
    make_loras(pipe, "sd3")
    with compose(pipe, ["cross", "yellow"], "clora", prompt="yellow cross", refine_iters=0, step_size=1.0) as stats:
        moves = trace(stats.composer)
        pipe("yellow cross", num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", **generate_kwargs(pipe))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and len(moves) == 2  # first half
    for latents, before, after, stepped in moves:
        assert torch.equal(before, latents)  # flow matching feeds the latent unscaled
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(stepped, after, rtol=0, atol=1e-6)
