"""A small conditional VAE over factor-space coordinates, the generator both SG-LoRA and ICM-LoRA train.

Encoder q(z | x, c) and decoder p(x | z, c) are two-layer MLPs; the condition c (a description embedding or a task
vector) enters both through one learned projection. Loss: mean squared reconstruction error + β · KL(q || N(0, I)),
β = 0.005 as in ICM-LoRA's official CVAE. Trained full-batch with Adam (the training sets are tens of adapters).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalVAE(nn.Module):
    """x [N, dim] given c [N, cond_dim]: encode to (mu, logvar) [N, latent], decode (z, c) back to x."""

    def __init__(self, dim: int, cond_dim: int, latent: int = 8, hidden: int = 128, cond_hidden: int = 32):
        super().__init__()
        self.latent = latent
        self.cond = nn.Sequential(nn.Linear(cond_dim, cond_hidden), nn.Tanh())
        self.enc = nn.Sequential(nn.Linear(dim + cond_hidden, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent + cond_hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(torch.cat([x, self.cond(c)], -1)).chunk(2, -1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.cat([z, self.cond(c)], -1))

    def loss(self, x: torch.Tensor, c: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor:
        mu, logvar = self.encode(x, c)
        eps = torch.randn(mu.shape, generator=generator)
        recon = self.decode(mu + eps * (0.5 * logvar).exp(), c)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
        return F.mse_loss(recon, x) + beta * kl

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def train_cvae(x: torch.Tensor, c: torch.Tensor, *, latent: int = 8, hidden: int = 128, steps: int = 800,
               lr: float = 5e-3, beta: float = 0.005, seed: int = 0) -> ConditionalVAE:
    """A ConditionalVAE fitted to (x, c) pairs, drawn and trained from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConditionalVAE(x.shape[1], c.shape[1], latent, hidden)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = model.loss(x, c, beta, generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)
