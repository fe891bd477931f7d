"""A small text-to-image pipeline on diffusers' components: the testbed's network, usable like any diffusers pipeline.

``ConceptPipeline`` is a ``DiffusionPipeline`` with diffusers' LoRA loader (``load_lora_weights``,
``set_adapters``, ``save_lora_weights``), a ``UNet2DConditionModel``, a ``CLIPTextModel`` built from a config and a
word-level tokenizer. Its latent space is the image itself rearranged losslessly 2x2 space-to-depth (32x32 RGB ->
12 channels at 16x16), which halves the UNet's resolution without an autoencoder to train. Its loop is the usual one (scheduler steps,
classifier-free guidance batched as [uncond, text], ``callback_on_step_end``), so what composes LoRAs on it composes
them on Stable Diffusion pipelines too.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .shapes import SIZE, VOCAB

MAX_TOKENS = 8
TEXT_DIM = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # attention and resnet convolutions
PATCH = 2


def to_latents(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 12, H/2, W/2) latents (2x2 space-to-depth, exact)."""
    return torch.nn.functional.pixel_unshuffle(images, PATCH)


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_latents``."""
    return torch.nn.functional.pixel_shuffle(latents, PATCH)


def build_tokenizer(words=VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (pad id 0, unknown id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    """A tiny CLIP text encoder from a config (random weights)."""
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=0,
                                        eos_token_id=0))


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """A tiny text-conditioned UNet on 16x16 latents: a plain block, then cross-attention at 8x8 and in the middle."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE // PATCH, in_channels=3 * PATCH ** 2, out_channels=3 * PATCH ** 2, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8)


class ConceptPipelineOutput(BaseOutput):
    """Images (PIL list, or an (N, 3, H, W) tensor in [-1, 1] for ``output_type="pt"``)."""

    images: list | torch.Tensor


class ConceptPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image in pixel space with classifier-free guidance; LoRAs load as on Stable Diffusion."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast,
                 scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the encoder's length; an error names a prompt that is too long."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=False).input_ids
        if max(map(len, ids)) > MAX_TOKENS:
            raise ValueError(f"prompt has more than {MAX_TOKENS} tokens, the text encoder's length: {prompts}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(N, MAX_TOKENS, TEXT_DIM) text states for the UNet's cross-attention."""
        return self.text_encoder(self.token_ids(prompts))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: Optional[torch.Generator | list[torch.Generator]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 cross_attention_kwargs: Optional[dict] = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts)
        cond = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        states = torch.cat([self.encode_prompt([""] * n), cond]) if guided else cond
        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=cond.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x = torch.cat([latents] * 2) if guided else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=states, cross_attention_kwargs=cross_attention_kwargs,
                            return_dict=False)[0]
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).pop("latents", latents)
        images = to_images(latents).clamp(-1, 1)
        if output_type == "pil":
            arr = ((images.permute(0, 2, 3, 1).cpu().float().numpy() + 1) * 127.5).round().astype(np.uint8)
            images = [Image.fromarray(a) for a in arr]
        return ConceptPipelineOutput(images=images) if return_dict else (images,)


def build_pipeline(seed: int = 0) -> ConceptPipeline:
    """An untrained pipeline of the testbed's sizes (tests build it in well under a second)."""
    tokenizer = build_tokenizer()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return ConceptPipeline(build_unet(seed), build_text_encoder(len(tokenizer), seed), tokenizer, scheduler)
