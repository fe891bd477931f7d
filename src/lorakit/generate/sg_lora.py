"""SG-LoRA: an adapter for an unseen task from its description alone.

Paper: "Semantic-guided LoRA Parameters Generation", Li et al., arXiv 2509.10535 (CVPR 2026).
Rule: embed the new task's description (MiniLM sentence embedding, unit length); weight the top-k expert tasks by
``softmax(cos(e_new, e_i) / temperature)``; a CVAE trained on the experts' LoRAs, conditioned on their description
embeddings, decodes the new LoRA from the prior those weights shape: condition ``normalize(Σ w_i e_i)`` and
``z ~ N(Σ w_i mu_i, Σ w_i sigma_i²)`` (mu_i, sigma_i: the encoder's posterior for expert i). ``sample=False`` takes
the prior's mean. Nothing is trained on the new task's data.

Deviations, and why: the official code (github.com/keepgoingjkg/SG-LoRA) was not available to us, so the prior and
the condition follow the paper's description as summarised above; the text encoder is MiniLM rather than CLIP's
(it ships here); the CVAE works in the experts' principal-component space (``params.Factors``) rather than on the
raw flattened vector, so that a few tens of experts suffice to fit it; the experts share one LoRA initialisation
(the zoo's ``INIT_SEED``), which makes their raw factors comparable.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import GENERATORS
from .cvae import train_cvae
from .features import embed
from .params import Factors, ParamSpace
from .zooindex import Zoo


@GENERATORS.register()
class SGLoRA:
    """Fitted on a zoo's experts; ``generate(description)`` returns a LoRA AdapterState."""

    name = "sg_lora"

    def __init__(self, top_k: int = 3, temperature: float = 0.05, factors: int = 16, latent: int = 8,
                 steps: int = 800, beta: float = 0.005, seed: int = 0):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {top_k} and {temperature}")
        self.top_k, self.temperature, self.k, self.latent = top_k, temperature, factors, latent
        self.steps, self.beta, self.seed = steps, beta, seed

    def fit(self, zoo: Zoo, names: list[str] | None = None) -> SGLoRA:
        """Train the generator on the zoo's expert adapters (or the named ones) and their descriptions."""
        start = time.perf_counter()
        entries = [zoo.entry(n) for n in names] if names else zoo.entries("expert")
        self.names = [e["name"] for e in entries]
        self.descriptions = [e["description"] for e in entries]
        self.space = ParamSpace.fit([zoo.state(n) for n in self.names], self.names)
        x = torch.stack([self.space.flatten(zoo.state(n)) for n in self.names])
        self.factors = Factors.fit(x, self.k)
        self.coords = self.factors.encode(x)
        self.semantics = embed(self.descriptions)
        self.cvae = train_cvae(self.coords, self.semantics, latent=self.latent, steps=self.steps, beta=self.beta,
                               seed=self.seed)
        self.posterior = self.cvae.encode(self.coords, self.semantics)
        self.fit_seconds = time.perf_counter() - start
        return self

    def weights(self, description: str) -> dict[str, float]:
        """The top-k experts and their weights for ``description`` (softmax of cosine / temperature)."""
        if not description or not description.strip():
            raise ValueError("the task description is empty; SG-LoRA generates from a description (a sentence "
                             "saying what the task is)")
        sims = self.semantics @ embed([description])[0]
        top = sims.topk(min(self.top_k, len(self.names)))
        w = torch.softmax(top.values / self.temperature, 0)
        return {self.names[i]: float(v) for i, v in zip(top.indices.tolist(), w)}

    def generate(self, description: str, sample: bool = False, seed: int = 0):
        """A LoRA AdapterState for the task ``description`` names (the prior's mean unless ``sample``)."""
        chosen = self.weights(description)
        idx = torch.tensor([self.names.index(n) for n in chosen])
        w = torch.tensor(list(chosen.values())).unsqueeze(1)
        cond = F.normalize((w * self.semantics[idx]).sum(0), dim=-1)
        mu, logvar = self.posterior
        z = (w * mu[idx]).sum(0)
        if sample:
            std = (w * logvar[idx].exp()).sum(0).sqrt()
            z = z + std * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            coords = self.cvae.decode(z.unsqueeze(0), cond.unsqueeze(0))[0]
        return self.space.unflatten(self.factors.decode(coords))

    def nbytes(self) -> int:
        """Bytes the fitted generator keeps (space, factors, CVAE, expert embeddings and posteriors)."""
        extra = (self.semantics.numel() + sum(t.numel() for t in self.posterior)) * 4
        return self.space.nbytes() + self.factors.nbytes() + self.cvae.nbytes() + extra
