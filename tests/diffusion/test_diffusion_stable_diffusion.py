"""The same composition on diffusers' own StableDiffusionPipeline (tiny components from configs): its loop, its
VAE and guidance, LoRA files through its loader."""
from __future__ import annotations

import json
import string

import pytest
import torch
from diffusion_testbed import make_lora

from lorakit.diffusion import compose, load_loras, save_lora


def tiny_stable_diffusion(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(letters)},
             **{c + "</w>": i + 28 for i, c in enumerate(letters)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_with_loras(tmp_path):
    maker = tiny_stable_diffusion(tmp_path)
    paths = []
    for i, name in enumerate(["cross", "yellow"]):
        make_lora(maker, name, seed=20 + i, targets=["to_q", "to_k", "to_v", "to_out.0"])
        paths.append(save_lora(maker, name, tmp_path / name))
    pipe = tiny_stable_diffusion(tmp_path)
    return pipe, load_loras(pipe, paths)


def _generate(pipe, **kw):
    return pipe("a cross", num_inference_steps=3, height=16, width=16, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_merge_and_switch_on_stable_diffusion(sd_with_loras):
    pipe, names = sd_with_loras
    with compose(pipe, names, "merge", [0.5, 1.5]) as stats:
        ours = _generate(pipe)
    pipe.set_adapters(names, [0.5, 1.5])
    torch.testing.assert_close(ours, _generate(pipe), rtol=0, atol=1e-6)
    assert stats.evaluations == 3
    with compose(pipe, names, "switch", every=1) as stats:
        _generate(pipe)
    assert [c[1] for c in stats.calls] == [("cross",), ("cross",), ("yellow",)]


def test_composite_on_stable_diffusion_averages_per_lora_predictions(sd_with_loras):
    pipe, names = sd_with_loras
    seen = []

    def record(pipeline, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    with compose(pipe, names, "composite") as stats:
        _generate(pipe, callback_on_step_end=record)
    assert stats.evaluations == 3 * 2 and stats.generations == 1
    # the first step by hand: the pipeline's guidance over the mean of the two LoRAs' batched predictions
    pipe.scheduler.set_timesteps(3)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    cond, uncond = pipe.encode_prompt("a cross", "cpu", 1, True)
    states = torch.cat([uncond, cond])
    eps = []
    for name in names:
        pipe.unet.set_adapters([name])
        with torch.no_grad():
            eps.append(pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=states).sample)
    assert not torch.allclose(eps[0], eps[1], atol=1e-4)  # the LoRAs differ, so the mean is not either one
    u, c = ((eps[0] + eps[1]) / 2).chunk(2)
    want = pipe.scheduler.step(u + 5.0 * (c - u), t, latents).prev_sample
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-5)


def test_attention_methods_on_stable_diffusion(sd_with_loras):
    """CLoRA and LoRA-Composer through Stable Diffusion's loop, CLIP tokens (start token, word pieces) and VAE."""
    pipe, names = sd_with_loras
    prompt = "a yellow cross"
    with compose(pipe, names, "clora", prompt=prompt, step_size=0, threshold=2.0):  # no LoRA mask: the base
        base_only = pipe(prompt, num_inference_steps=3, height=16, width=16, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.unet.disable_adapters()
    base = pipe(prompt, num_inference_steps=3, height=16, width=16, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.unet.enable_adapters()
    torch.testing.assert_close(base_only, base, rtol=0, atol=2e-5)
    with compose(pipe, names, "clora", prompt=prompt, refine_iters=1) as stats:
        moved = pipe(prompt, num_inference_steps=3, height=16, width=16, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert stats.composer.tokens == [[[8, 9, 10, 11, 12], [2, 3, 4, 5, 6, 7]]]  # cross, yellow: after <start> "a"
    assert torch.isfinite(moved).all() and not torch.allclose(moved, base, atol=1e-4)
    with compose(pipe, names, "lora_composer", prompt=prompt, layout=[(0, 0, 8, 16), (8, 0, 16, 16)]) as stats:
        boxed = pipe(prompt, num_inference_steps=3, height=16, width=16, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(boxed).all() and stats.evaluations == 3 + 2 + 1  # steps 0, 1 (<= T/2) refine
    assert "step" not in vars(pipe.scheduler)
