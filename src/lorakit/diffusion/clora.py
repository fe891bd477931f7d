"""CLoRA: a contrastive update of the latent over each LoRA's cross-attention maps, then attention masks fuse them.

Paper: "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models" (Meral et al., arXiv 2403.19776); official
code gemlab-vt/CLoRA (``pipeline_clora.py``, ``utils.py``, the example notebook), read through a public copy.
Update rule, per step k: every branch b (the base model, then each LoRA alone) predicts eps_b at latent x and
records its cross-attention maps A_b (mean over the layers at one resolution, heads and guidance copies). While
k < until * T, x <- x - step_size * grad_x L, L the NT-Xent loss (temperature 0.5, cosine similarity) over the
min-max normalised maps A_b[:, :, t] of every concept token t of every branch, labelled by concept word: one concept's
maps across branches are positives, other concepts' maps negatives. At the steps ``refine_at`` (fractions of T) the
update is repeated ``refine_iters`` more times. The eps_b of the last evaluation (before the last update) are fused:
M_b = 1 where A_b at LoRA b's tokens exceeds ``threshold`` x its max (union over tokens), the base branch takes the
cells no mask covers, eps = sum_b M_b eps_b / sum_b M_b; the scheduler then steps from the updated latent.
Decisions, from the official code: temperature 0.5; the notebook's step_size 20, alterations for the first half
of the steps, refinement at 0, 10% and 20% of the steps with 20 iterations, mask threshold 0.4 (the function's
default is 0.3); no morphology on the masks (the notebook's setting); masks upsampled nearest; maps at the
resolution latent side / 4 (16x16 for Stable Diffusion at 512), or the finest the denoiser has when it has none
there (8x8 on the testbed).
Deviations: one prompt for every branch (the official code gives each LoRA its own prompt and the base branch a
generic one), so a concept's tokens are its word in that prompt; the LoRAs' text-encoder parts are not used
(``use_text_encoder_lora``); no separate style LoRA. ``background=False`` drops the base branch, the first LoRA
then taking the uncovered cells (the official code's rule for its first branch). The NT-Xent loss is computed here
(pytorch-metric-learning's formula without its 1e-20 inside the log); a batch of images sums their losses, which
moves each latent by its own loss's gradient. Pipelines that run guidance branches as separate denoiser calls are
refused when the latent is updated. On joint attention (SD3) a map is the image-query x text-key block of the
joint scores renormalised over the text keys; under Euler-type schedulers the latent step is taken on the
denoiser's input (attention.py); the official step size is kept for DiTs and flow matching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionComposer, images_mean
from .compose import COMPOSERS


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean over positive pairs (a, p) of -log(e^{s_ap/T} / (e^{s_ap/T} + sum_{n: other label} e^{s_an/T}))."""
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not positive.any() or same.all():
        return embeddings.sum() * 0.0  # no pair to pull together or none to push apart
    a, p = positive.nonzero(as_tuple=True)
    negatives = torch.logsumexp(sim.masked_fill(same, float("-inf"))[a], dim=1)
    return (torch.logaddexp(sim[a, p], negatives) - sim[a, p]).mean()


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to [0, 1] (the official normalisation of each attention map)."""
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


@COMPOSERS.register()
class CLoRA(AttentionComposer):
    """Contrastive latent update over per-LoRA attention maps, then attention-mask fusion of their predictions."""

    name = "clora"
    step_size: float = 20.0
    until: float = 0.5
    refine_at: str = "0,0.1,0.2"
    refine_iters: int = 20
    threshold: float = 0.4
    temperature: float = 0.5
    background: bool = True

    def reset(self, total_steps):
        super().reset(total_steps)
        self.losses: list[tuple[int, float]] = []  # (step, loss before each latent update)

    def moves_latent(self):
        return self.step_size > 0

    def branches(self) -> list[tuple[list[str], list[float], int]]:
        """(adapters, weights, concept index or -1 for the base) per branch."""
        loras = [([a], [w], i) for i, (a, w) in enumerate(zip(self.adapters, self.weights))]
        return ([([], [], -1)] if self.background else []) + loras

    def loss(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Summed over images: NT-Xent over every branch's maps of every concept token, labelled by concept."""
        total = 0.0
        for j, tokens in enumerate(self.tokens):
            emb, labels = [], []
            for m in maps:
                for c, positions in enumerate(tokens):  # LoRAs naming the same word share a concept
                    emb += [minmax(m[j, :, t]) for t in positions]
                    labels += [self.concept_words.index(self.concept_words[c])] * len(positions)
            total = total + nt_xent(torch.stack(emb), torch.tensor(labels, device=emb[0].device), self.temperature)
        return total

    def masks(self, maps: list[torch.Tensor], grid, size) -> torch.Tensor:
        """(branches, n, H, W) binary masks; every cell covered by at least one."""
        out = []
        for (_, _, c), m in zip(self.branches(), maps):
            if c < 0:
                out.append(torch.zeros_like(m[:, :, 0]))
                continue
            on = [m[j][:, self.tokens[j][c]] for j in range(len(self.tokens))]  # (P, tokens) per image
            out.append(torch.stack([(a > self.threshold * a.amax(0)).any(1) for a in on]).float())
        masks = torch.stack(out).unflatten(-1, grid)
        masks[0] = torch.where(masks.sum(0) == 0, 1.0, masks[0])
        return F.interpolate(masks, size=size, mode="nearest")

    def evaluate_all(self, run, x, k, grad=False):
        eps, maps = [], []
        for names, scales, _ in self.branches():
            e, store = self.evaluate(run, names, scales, x, k, grad=grad)
            grid = self.side(store)
            eps.append(e)
            maps.append(images_mean(store[True, grid], len(self.prompts)))
        return eps, maps, grid

    def predict(self, step, run):
        x, k = self.latent()
        update = self.step_size > 0 and step < self.until * self.total_steps
        if update and self.slot > 0:
            raise ValueError("clora: the latent update needs the guidance branches in one denoiser call; this "
                             "pipeline makes separate calls (pass step_size=0 to fuse without the update)")
        refine = {round(float(f) * self.total_steps) for f in self.refine_at.split(",") if f.strip()}
        moved = x
        for _ in range((1 + self.refine_iters * (step in refine)) if update else 0):
            with torch.enable_grad():
                xg = moved.detach().requires_grad_(True)
                eps, maps, grid = self.evaluate_all(run, xg, k, grad=True)
                loss = self.loss(maps)
                (grad,) = torch.autograd.grad(loss, [xg], allow_unused=True)
            self.losses.append((step, float(loss)))
            moved = moved - self.step_size * (grad if grad is not None else 0.0)
        if not update:
            eps, maps, grid = self.evaluate_all(run, x, k)
        if update:
            self.pending = (x, moved.detach())
        masks = self.masks([m.detach() for m in maps], grid, x.shape[-2:]).repeat(1, k, 1, 1)[:, :, None]
        eps = torch.stack([e.detach() for e in eps])
        return (masks * eps).sum(0) / masks.sum(0)
