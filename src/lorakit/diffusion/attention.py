"""What CLoRA and LoRA-Composer share: attention processors that keep the attention maps, concept tokens, latents.

``AttentionComposer`` installs ``Probe`` processors on every attention layer of the denoiser while the ``compose``
block is open. A probe computes attention exactly as diffusers' ``AttnProcessor`` does, with the probabilities
explicit, so that they can be recorded (with their gradient) and steered: the composer may add a bias to the scores
and rewrite a cross-attention layer's output. Each LoRA's concept is the word (default: the adapter's name) that
names it in the prompt; its token positions come from the pipeline's tokenizer. Methods that move the latent work
on the denoiser's input, which the denoiser sees repeated once per guidance branch: the pipeline's latent times the
scheduler's ``scale_model_input`` factor (1 for DDIM, DDPM, PNDM, DPM-Solver, UniPC and flow-matching Euler;
1 / sqrt(sigma^2 + 1) for Euler and Euler ancestral), the space Stable Diffusion's latent x_t lives in whatever the
scheduler; the scheduler then steps from that latent mapped back. Second-order schedulers (Heun, KDPM2) are refused.
Denoisers: UNets and DiTs built from diffusers' ``Attention`` (cross-attention as in PixArt, or SD3's joint attention,
whose image-query x text-key block is the cross-attention map); others are refused with the layer that fails.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .compose import Composer
from .probes import Probe, check_attention


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
        check_attention(denoiser, self.name)
        if self.moves_latent() and getattr(pipe.scheduler, "order", 1) > 1:
            raise ValueError(f"{self.name} moves the latent between steps; {type(pipe.scheduler).__name__} is a "
                             f"second-order scheduler (two denoiser calls per step, the second from the scheduler's "
                             f"own intermediate latent); use a first-order one (DDIM, Euler, flow-matching Euler, "
                             f"DPM-Solver, UniPC)")
        if not self.prompts:
            raise ValueError(f"{self.name} needs the prompt to find each LoRA's concept tokens: "
                             f"compose(pipe, names, {self.name!r}, prompt=...)")
        self.tokens = [[token_positions(pipe.tokenizer, p, w) for w in self.concept_words] for p in self.prompts]
        self.denoiser, self.scheduler = denoiser, pipe.scheduler
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

    def self_bias(self, grid, device=None) -> Optional[torch.Tensor]:
        """An additive bias on self-attention scores (positions, positions) on this grid and device, or None."""
        return None

    def rewrite(self, attn, out, grid, attend) -> torch.Tensor:
        """A cross-attention layer's image output (batch, positions, channels), changed or not; ``attend(name)`` gives
        the layer's attention output before ``to_out`` with LoRA ``name`` alone on the text keys and values, and
        those probabilities (batch, heads, positions, text tokens)."""
        return out

    def moves_latent(self) -> bool:
        """Whether this configuration changes the latent the scheduler steps from."""
        return True

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

    def update_latents(self, latents, timestep):
        """The moved latent in the scheduler's space: the update is made on the denoiser's input x_in = c x (c from
        ``scale_model_input``: 1 for DDIM and flow matching, 1 / sqrt(sigma^2 + 1) for Euler), so x' = x + dx_in / c."""
        if self.pending is None:
            return latents
        seen, moved = self.pending
        self.pending = None
        scale_input = getattr(self.scheduler, "scale_model_input", None)
        scaled, c = latents, 1.0
        if scale_input is not None:
            scaled = scale_input(latents.clone(), timestep)
            c = scale_input(torch.ones((), dtype=latents.dtype, device=latents.device), timestep)
        if not torch.equal(scaled, seen) or not torch.allclose(scaled, latents * c, rtol=1e-5, atol=1e-6):
            raise ValueError(f"{self.name} moves the latent, and needs the denoiser's input to be the stepped latent "
                             f"times the scheduler's scale_model_input factor; {type(self.scheduler).__name__}'s "
                             f"input to {type(self.denoiser).__name__} differed from that")
        return latents + (moved - seen) / c


def images_mean(maps: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Recorded maps [(batch, heads, P, T)] of one resolution -> (n, P, T), the mean over layers, heads, copies."""
    stacked = torch.stack([m.mean(1) for m in maps]).mean(0)  # (batch, P, T)
    return stacked.unflatten(0, (-1, n)).mean(0)
