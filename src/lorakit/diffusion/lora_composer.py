"""LoRA-Composer: layout boxes; each LoRA injected into cross-attention inside its box, concepts kept apart.

Paper: "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free Diffusion
Models" (Yang et al., arXiv 2403.11627); official code Young98CN/LoRA_Composer (``region_lora/multi_lora_sample.py``).
Update rule. A LoRA whose box is the whole image is a background LoRA, active in every layer (the official code
runs its background LoRA as the base model). In every cross-attention layer, inside box i the output is LoRA i's
attention over the prompt: softmax(q K_i^T / sqrt(d)) V_i through LoRA i's output projection (q from the base, K_i,
V_i and the projection with LoRA i alone on the base weights); outside every box it is the base's; overlapping boxes
average (concept injection). In self-attention, a query inside a box does not attend to keys of other boxes
(concept region mask). While refining, the latent takes a gradient step x <- x - 20 sqrt(s_k) grad L, s_k from 1
down to 0.5 over the steps, on L = sum_i [sum over i's concept tokens of 8 max(0, 1 - topk-mean(G_i * smooth(A)))
+ 2 l1 of the box's row and column projections against those of A inside the box (fill), + 10 topk-mean of the
self-attention from box i to outside it (isolation)], A LoRA i's map of one token (mean over layers at one
resolution and heads, text branch), G_i a Gaussian over the box, smooth a 3x3 Gaussian (sigma 0.5), top-k over
20% of the box's cells; refining stops after half the steps, or from 10% of them on once the loss rises. Before the
first step the latent inside each box is replaced by the latent under the box-sized window where its tokens' maps
sum highest, then the whole latent is renormalised to its former mean and std (latent re-initialisation). All
constants are the official code's.
Deviations: one prompt for all (the official code gives each region its own prompt through its LoRA's text
encoder; a concept's tokens are its word in the prompt); several background LoRAs are merged with their weights
(the official code takes one); a self-attention key shared by the query's own box stays visible (the official mask
hides it, so that coinciding boxes attend nowhere inside themselves); boxes are given in pixels (x0, y0, x1, y1) and
snapped to attention cells as the official code does (ceil start, floor end); a box narrower than one attention
cell is refused; top-k takes at least one cell; the loss is summed over a batch's images (each latent moves by its
own loss) and refining stops per image; without T2I-Adapter image conditions.
Beyond the paper (a Stable Diffusion UNet): on diffusion transformers with cross-attention the same rule applies to
their cross-attention layers; on joint attention (SD3), which has no separate cross-attention, a box's image queries
attend over the image keys and LoRA i's text keys and values (``add_k_proj``/``add_v_proj``, LoRA i alone) through
LoRA i's output projection, the text stream is left as is, and isolation masks the image x image block. Under
Euler-type schedulers the latent steps are taken on the denoiser's input (attention.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .adapters import activate
from .attention import AttentionComposer, images_mean
from .compose import COMPOSERS, check_layout
from .probes import project


def cells(box, size, grid) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1) on a (H, W) image as attention cells (r0, c0, r1, c1) on an (h, w) grid."""
    (x0, y0, x1, y1), (H, W), (h, w) = box, size, grid
    r0, c0, r1, c1 = math.ceil(y0 / H * h), math.ceil(x0 / W * w), math.floor(y1 / H * h), math.floor(x1 / W * w)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"layout box {tuple(box)} covers no cell of the {h}x{w} attention grid; give boxes at "
                         f"least {math.ceil(H / h)}x{math.ceil(W / w)} pixels")
    return r0, c0, r1, c1


def reinitialise(x: torch.Tensor, scores: list[torch.Tensor], boxes: list[tuple], scale: int) -> torch.Tensor:
    """x (C, H, W) with each box (cells) filled from the box-sized window where its (h, w) score sums highest."""
    out = x.clone()
    for score, (r0, c0, r1, c1) in zip(scores, boxes):
        window = F.conv2d(score[None, None], torch.ones(1, 1, r1 - r0, c1 - c0, dtype=score.dtype, device=score.device))[0, 0]
        top = int(window.flatten().argmax())
        r, c = divmod(top, window.shape[1])
        out[:, r0 * scale:r1 * scale, c0 * scale:c1 * scale] = \
            x[:, r * scale:(r + r1 - r0) * scale, c * scale:(c + c1 - c0) * scale]
    return (out - out.mean()) / out.std() * x.std() + x.mean()


def smooth(a: torch.Tensor) -> torch.Tensor:
    """The official 3x3 Gaussian smoothing (sigma 0.5, its exp(-((x - mu) / (2 sigma))^2) form), reflect padded."""
    g = torch.exp(-((torch.arange(3.0, device=a.device) - 1) / (2 * 0.5)) ** 2)
    kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    return F.conv2d(F.pad(a[None, None], (1, 1, 1, 1), mode="reflect"), kernel[None, None].to(a))[0, 0]


def box_loss(maps: torch.Tensor, self_map: torch.Tensor, box) -> torch.Tensor:
    """The official per-concept loss on its token maps (tokens, h, w) and the self-attention (h*w, h*w), box in cells.

    Injection and fill terms per token, the isolation term once, as in the official code."""
    h, w = maps.shape[-2:]
    r0, c0, r1, c1 = box
    inside = torch.zeros(h, w, dtype=torch.bool, device=maps.device)
    inside[r0:r1, c0:c1] = True
    k = max(int(inside.sum() * 0.2), 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r1 - r0, device=maps.device),
                            torch.linspace(-1, 1, c1 - c0, device=maps.device), indexing="ij")
    gauss = torch.zeros(h, w, dtype=maps.dtype, device=maps.device)
    gauss[r0:r1, c0:c1] = torch.exp(-(xx ** 2 + yy ** 2) / 2)
    box, total = inside.to(maps), 0.0
    for a in maps.reshape(-1, h, w):
        a = smooth(a)
        total = total + 8 * (1 - (a * gauss).flatten().topk(k).values.mean()).clamp_min(0)
        total = total + 2 * F.l1_loss((a * box).amax(0), box.amax(0)) + 2 * F.l1_loss((a * box).amax(1), box.amax(1))
    flat = inside.flatten()
    return total + 10 * self_map[flat][:, ~flat].flatten().topk(k).values.mean()


@COMPOSERS.register()
class LoRAComposer(AttentionComposer):
    """Region-aware LoRA injection, concept isolation and latent re-initialisation from layout boxes."""

    name = "lora_composer"
    uses_layout = True
    keeps_self = True
    reinit: bool = True
    until: float = 0.5

    def bind(self, pipe, denoiser):
        if self.layout is None:
            raise ValueError("lora_composer needs a layout: one box (x0,y0,x1,y1) per LoRA, the whole image for a "
                             "background LoRA")
        self.size = tuple(denoiser.config.sample_size * getattr(pipe, "vae_scale_factor", 2) for _ in range(2))
        self.layout = check_layout(self.layout, len(self.adapters), self.size[0])
        super().bind(pipe, denoiser)
        activate(denoiser, self.adapters, self.weights)  # every LoRA's scale, used when injected alone
        full = (0, 0, self.size[1], self.size[0])
        self.regions = [i for i, b in enumerate(self.layout) if tuple(b) != full]
        self.background = [i for i in range(len(self.adapters)) if i not in self.regions]

    def reset(self, total_steps):
        super().reset(total_steps)
        self.refining, self.last = None, None

    def region_cells(self, grid):
        return [cells(self.layout[i], self.size, grid) for i in self.regions]

    def region_masks(self, grid, device=None) -> torch.Tensor:
        out = torch.zeros(len(self.regions), grid[0], grid[1], dtype=torch.bool, device=device)
        for m, (r0, c0, r1, c1) in zip(out, self.region_cells(grid)):
            m[r0:r1, c0:c1] = True
        return out.flatten(1)  # (regions, h*w)

    def self_bias(self, grid, device=None):
        if not self.regions:
            return None
        m = self.region_masks(grid, device).float()
        shared = (m.T @ m) > 0  # query and key in a common box
        boxed = m.any(0)
        hidden = boxed[:, None] & boxed[None, :] & ~shared
        return hidden.float() * -1e6

    def rewrite(self, attn, out, grid, attend):
        if not self.regions:
            return out
        masks = self.region_masks(grid, out.device).to(out)  # (regions, P)
        count = masks.sum(0)
        new = out * (count == 0)[None, :, None]
        for r, i in enumerate(self.regions):
            name = self.adapters[i]
            o, probs = attend(name)
            self.record("region", (grid, r), probs)
            o = attn.to_out[1](project(attn.to_out[0], o, name))
            new = new + o * (masks[r] / count.clamp_min(1))[None, :, None]
        return new

    def concept_maps(self, store, n):
        grid = self.side(store)
        maps = [images_mean(store["region", (grid, r)], n) for r in range(len(self.regions))]  # (n, P, T) each
        return grid, [[m[j][:, self.tokens[j][i]].T.unflatten(1, grid) for m, i in zip(maps, self.regions)]
                      for j in range(n)]  # per image, per region: (tokens, h, w)

    def predict(self, step, run):
        x, k = self.latent()
        n = x.shape[0]
        rows = torch.arange((k - 1) * n, k * n, device=x.device)  # the text branch: the last copy ([uncond, text] in diffusers)
        names = [self.adapters[i] for i in self.background]
        scales = [self.weights[i] for i in self.background]
        moved = x
        if self.regions and step == 0 and self.reinit:
            _, store = self.evaluate(run, names, scales, x, k, rows=rows)
            grid, maps = self.concept_maps(store, n)
            boxes = self.region_cells(grid)
            scale = x.shape[-1] // grid[1]
            moved = torch.stack([reinitialise(x[j], [a.sum(0) for a in maps[j]], boxes, scale) for j in range(n)])
        if self.refining is None:
            self.refining = torch.ones(n, dtype=torch.bool, device=x.device)
        if self.regions and step <= self.until * self.total_steps and self.refining.any():
            with torch.enable_grad():
                xg = moved.detach().requires_grad_(True)
                _, store = self.evaluate(run, names, scales, xg, k, rows=rows, grad=True)
                grid, maps = self.concept_maps(store, n)
                self_maps = images_mean(store[False, grid], n)
                losses = torch.stack([sum(box_loss(a, self_maps[j], b) for a, b in
                                          zip(maps[j], self.region_cells(grid))) for j in range(n)])
                (grad,) = torch.autograd.grad(losses.sum(), [xg])
            lr = 20 * math.sqrt(1.0 - 0.5 * step / max(self.total_steps - 1, 1))
            keep = self.refining.to(x)[:, None, None, None]
            moved = (moved - lr * grad * keep).detach()
            losses = losses.detach()
            rose = self.last is not None and step >= 0.1 * self.total_steps
            stop = (losses > self.last) & rose if rose else torch.zeros(n, dtype=torch.bool, device=x.device)
            self.refining &= ~(stop | (step >= self.until * self.total_steps))
            self.last = losses
        if moved is not x:
            self.pending = (x, moved)
        eps, _ = self.evaluate(run, names, scales, moved, k)
        return eps
