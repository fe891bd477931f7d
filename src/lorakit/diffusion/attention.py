"""What CLoRA and LoRA-Composer share: attention processors that keep the attention maps, concept tokens, latents.

``AttentionComposer`` installs ``Probe`` processors on every attention layer of the denoiser while the ``compose``
block is open. A probe computes attention exactly as diffusers' ``AttnProcessor`` does, with the probabilities
explicit, so that they can be recorded (with their gradient) and steered: the composer may add a bias to the scores
and rewrite a cross-attention layer's output. Each LoRA's concept is the word (default: the adapter's name) that
names it in the prompt; its token positions come from the pipeline's tokenizer. Methods that move the latent work
on the pipeline's latent itself, which the denoiser sees repeated once per guidance branch; they need a scheduler
that feeds it unscaled (DDIM, DDPM, PNDM, DPM-Solver, UniPC), and refuse another.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .compose import Composer


class Probe:
    """An attention processor that records probabilities and lets its composer steer scores and outputs."""

    def __init__(self, owner: "AttentionComposer"):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, positions, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        context = hidden_states if not cross else \
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        grid = self.owner.grid(positions)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        bias = None if cross else self.owner.self_bias(grid)  # (positions, positions) or None
        if bias is not None:
            attention_mask = bias[None] if attention_mask is None else attention_mask + bias
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, positions, keys)
        self.owner.record(cross, grid, probs.unflatten(0, (batch, -1)))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if cross:
            out = self.owner.rewrite(attn, query, context, out, grid)
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def project(layer, x: torch.Tensor, adapter: Optional[str]) -> torch.Tensor:
    """``layer(x)`` with exactly ``adapter`` (None: none) on its base weights, whichever adapters are active.

    PEFT's LoRA rule, base(x) + B(A(x)) * scaling, with the scaling ``set_adapters`` gave; variants (DoRA) refused."""
    if not hasattr(layer, "lora_A"):
        return layer(x)
    out = layer.base_layer(x)
    if adapter is None or adapter not in layer.lora_A:
        return out
    if adapter in getattr(layer, "lora_variant", {}):
        raise ValueError(f"LoRA {adapter!r} is a LoRA variant (e.g. DoRA); region injection takes plain LoRAs only")
    return out + layer.lora_B[adapter](layer.lora_A[adapter](layer.lora_dropout[adapter](x))) * layer.scaling[adapter]


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions in the encoded ``prompt`` of the tokens of ``word``; an error when the prompt lacks it."""
    ids = tokenizer(prompt).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if sub and ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise ValueError(f"the concept word {word!r} is not in the prompt {prompt!r}; name each LoRA's concept in the "
                     f"prompt, or give the words with the option words=w1,w2,...")


class AttentionComposer(Composer):
    """Base of the attention-based methods: processors, concept tokens, the latent seen by the denoiser."""

    keeps_self = False  # whether self-attention maps are recorded too
    words: str = ""  # comma-separated concept word per LoRA; default: the adapter names
    attn_res: int = 0  # side of the attention maps used; 0: latent side / 4 if present, else the finest

    def __init__(self, adapters, weights=None, layout=None, prompt=None, **options):
        super().__init__(adapters, weights, layout=layout, **options)
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        words = [w.strip() for w in self.words.split(",")] if self.words else list(self.adapters)
        if len(words) != len(self.adapters):
            raise ValueError(f"{self.name}: {len(words)} concept words for {len(self.adapters)} LoRAs")
        self.concept_words = words

    def bind(self, pipe, denoiser):
        from diffusers import UNet2DConditionModel

        if not isinstance(denoiser, UNet2DConditionModel):
            raise ValueError(f"{self.name} steers a UNet's cross-attention (Stable Diffusion 1.x/2.x/XL and the like); "
                             f"this pipeline's denoiser is a {type(denoiser).__name__}")
        if not self.prompts:
            raise ValueError(f"{self.name} needs the prompt to find each LoRA's concept tokens: "
                             f"compose(pipe, names, {self.name!r}, prompt=...)")
        self.tokens = [[token_positions(pipe.tokenizer, p, w) for w in self.concept_words] for p in self.prompts]
        self.denoiser = denoiser
        self.saved = denoiser.attn_processors
        denoiser.set_attn_processor(Probe(self))
        self.recording = False
        self.pending = None

    def unbind(self):
        """Put the denoiser's own attention processors back."""
        self.denoiser.set_attn_processor(self.saved)

    # hooks the probes call; subclasses override the last two
    def grid(self, positions: int) -> tuple[int, int]:
        """(h, w) of a feature map of ``positions`` cells with the latent's aspect."""
        h0, w0 = self.sample.shape[-2:]
        d = math.sqrt(h0 * w0 / positions)
        h, w = round(h0 / d), round(w0 / d)
        if h * w != positions:
            raise ValueError(f"{self.name}: an attention layer of {positions} positions does not tile the {h0}x{w0} "
                             "latent; this denoiser's attention layout is not supported")
        return h, w

    def record(self, cross: bool, grid, probs: torch.Tensor) -> None:
        """Keep ``probs`` (batch, heads, positions, keys) while an evaluation records."""
        if self.recording and (cross or self.keeps_self):
            self.store.setdefault((cross, grid), []).append(probs)

    def self_bias(self, grid) -> Optional[torch.Tensor]:
        """An additive bias on self-attention scores (positions, positions) on this grid, or None."""
        return None

    def rewrite(self, attn, query, context, out, grid) -> torch.Tensor:
        """A cross-attention layer's output (batch, positions, channels), changed or not."""
        return out

    # the latent and the recorded maps
    def latent(self) -> tuple[torch.Tensor, int]:
        """The pipeline's latent (n, C, H, W) and the number k of copies in this call's input (guidance branches)."""
        n = len(self.prompts)
        if self.sample.shape[0] % n:
            raise ValueError(f"{self.name}: {len(self.prompts)} prompts given but the denoiser's batch is "
                             f"{self.sample.shape[0]}; give one prompt per image")
        k = self.sample.shape[0] // n
        copies = self.sample.chunk(k)
        if any(not torch.equal(c, copies[0]) for c in copies[1:]):
            raise ValueError(f"{self.name}: the guidance branches do not share one latent")
        return copies[0], k

    def evaluate(self, run, names, scales, x: torch.Tensor, k: int, rows=None, grad: bool = False):
        """The noise prediction at latent ``x`` (repeated k times, or only ``rows``) and the maps it recorded."""
        self.store, self.recording = {}, True
        try:
            with torch.set_grad_enabled(grad):
                on = torch.cat([x] * k) if rows is None else x
                eps = run(names, scales, on=on, rows=rows)
        finally:
            self.recording = False
        return eps, self.store

    def side(self, store, cross: bool = True) -> tuple[int, int]:
        """The map resolution used: ``attn_res``, else latent side / 4 where recorded, else the finest recorded."""
        grids = sorted({g for c, g in store if c == cross}, key=lambda g: g[0] * g[1])
        if not grids:
            raise ValueError(f"{self.name}: the denoiser has no {'cross' if cross else 'self'}-attention layer")
        want = self.attn_res or self.sample.shape[-1] // 4
        return next((g for g in grids if g[1] == want), grids[-1])

    def update_latents(self, latents):
        if self.pending is None:
            return latents
        seen, moved = self.pending
        self.pending = None
        if not torch.equal(latents, seen):
            raise ValueError(f"{self.name} moves the latent, and needs a scheduler that gives the denoiser the latent "
                             f"unscaled (DDIM, DDPM, PNDM, DPM-Solver, UniPC); "
                             f"{type(self.denoiser).__name__}'s input differed from the latent stepped")
        return moved


def images_mean(maps: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Recorded maps [(batch, heads, P, T)] of one resolution -> (n, P, T), the mean over layers, heads, copies."""
    stacked = torch.stack([m.mean(1) for m in maps]).mean(0)  # (batch, P, T)
    return stacked.unflatten(0, (-1, n)).mean(0)
