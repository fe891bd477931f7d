"""Tiny diffusion-transformer pipelines from configs (random weights), on diffusers' own pipeline classes.

``build_pixart`` is a ``PixArtAlphaPipeline``: a ``PixArtTransformer2DModel`` with self- and cross-attention, a T5
encoder, DDIM. ``build_sd3`` is a ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` whose attention is joint
(image and text tokens in one softmax), two CLIP encoders (no T5: the pipeline feeds zeros in its place),
flow-matching Euler. ``build_flux`` is a ``FluxPipeline`` (packed latents; generate it at height=width=16). Both take the testbed's word-level tokenizer and make 16x16 images from 8x8x4 latents (2x2
patches: a 4x4 token grid). They exist for tests and the DiT timing benchmark; nothing here is trained.
"""
from __future__ import annotations

import torch

from .pipeline import build_tokenizer

PIXART_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD3_TARGETS = PIXART_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SIDE = 16  # image side in pixels


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, shift_factor=0.0)


def build_pixart(seed: int = 0):
    """A tiny PixArt-alpha pipeline (cross-attention DiT, DDIM)."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    text = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   pad_token_id=0, decoder_start_token_id=0))
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text, vae=_vae(), transformer=transformer,
                               scheduler=DDIMScheduler())
    return _ready(pipe)


def build_sd3(seed: int = 0):
    """A tiny Stable Diffusion 3 pipeline (joint-attention DiT, flow-matching Euler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=32, pad_token_id=0,
                            bos_token_id=0, eos_token_id=0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=build_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    return _ready(pipe)


def _ready(pipe):
    """Modules in eval mode (built from configs they train: T5's dropout would make every call random)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux(seed: int = 0):
    """A tiny Flux pipeline (double- and single-stream blocks on ``FluxAttention``, packed latents, flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        projection_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 pad_token_id=0, decoder_start_token_id=0))
    return _ready(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=clip,
                               tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=build_tokenizer(),
                               transformer=transformer))


BUILDERS = {"pixart": (build_pixart, PIXART_TARGETS), "sd3": (build_sd3, SD3_TARGETS)}  # every method runs on these
TARGETS = {"pixart": PIXART_TARGETS, "sd3": SD3_TARGETS, "flux": PIXART_TARGETS}


def add_random_loras(pipe, kind: str, names, seed: int = 10, scale: float = 0.5) -> None:
    """Add LoRAs ``names`` (r=2, alpha=4, random non-zero factors scaled by ``scale``) to a tiny ``kind`` pipeline."""
    from peft import LoraConfig

    from .adapters import add_adapter

    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        add_adapter(pipe.transformer, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=TARGETS[kind]), name)
        with torch.no_grad():
            for n, p in pipe.transformer.named_parameters():
                if f".{name}." in n:
                    p.mul_(scale)


def generate_kwargs(pipe) -> dict:
    """Call arguments for generating at the denoiser's native size: PixArt's resolution binning off (it would resize
    to the pretrained resolutions' bins)."""
    import inspect

    kwargs = {}
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "use_resolution_binning" in parameters:  # PixArt bins sizes to its pretrained resolutions, not ours
        kwargs["use_resolution_binning"] = False
    return kwargs
