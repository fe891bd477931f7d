"""ICM-LoRA: a conditional VAE over adapter parameters, conditioned on task vectors, trained across tasks.

Paper: "In-Context Meta LoRA Generation", Shao et al., arXiv 2501.17635 (IJCAI 2025).
Rule: a task's vector is the base model's last hidden state on a few of the task's examples, averaged (official
code: the last layer's hidden state at the final time step, averaged over 30 training samples); a CVAE is trained on
(LoRA parameters, task vector) pairs from every training task, several checkpoints per task; generation decodes
``z ~ N(0, I)`` (``sample=False``: z = 0) with the task vector of the requested task.

Deviations, and why: the official code takes the task vector from the task's own fine-tuned model; an unseen task
has none, so training and generation both take it from the base model (zero adapter), on labelled demonstrations
written "<label>: <text>" (the in-context form; labels make two tasks over the same texts differ). An encoder's
vector is the token mean of its last layer (no final token plays the role a decoder's has); a causal LM's is the
last real token. The CVAE works on principal-component coordinates of the standardised parameters (``Factors``),
not on the raw vector through 1-D convolutions: with tens of adapters the convolutional CVAE has far more weights
than data. Task vectors are standardised per dimension with the training tasks' statistics.
"""
from __future__ import annotations

import time

import torch

from . import GENERATORS
from .cvae import train_cvae
from .features import hidden_mean
from .params import Factors, ParamSpace
from .zooindex import Zoo


def demonstrations(rows: list[dict], label_names, shots: int) -> list[str]:
    """``shots`` examples written "<label>: <text>", classes taken in turn."""
    by_label: dict[int, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["text"])
    out, i = [], 0
    while len(out) < shots and any(i < len(v) for v in by_label.values()):
        out += [f"{label_names[y]}: {texts[i]}" for y, texts in sorted(by_label.items()) if i < len(texts)]
        i += 1
    return out[:shots]


@GENERATORS.register()
class ICMLoRA:
    """Fitted on a zoo's experts (final adapters and snapshots); ``generate(task_vector)`` returns a LoRA state."""

    name = "icm_lora"

    def __init__(self, factors: int = 16, latent: int = 8, steps: int = 800, beta: float = 0.005, seed: int = 0,
                 snapshots: bool = True, causal: bool = False):
        self.k, self.latent, self.steps, self.beta, self.seed = factors, latent, steps, beta, seed
        self.snapshots, self.causal = snapshots, causal

    def task_vector(self, model, tokenizer, demos: list[str]) -> torch.Tensor:
        """The task vector [hidden] of ``demos`` (already written "<label>: <text>") on the base ``model``."""
        if not demos:
            raise ValueError("ICM-LoRA needs at least one labelled example of the task to compute its task vector")
        return hidden_mean(model, tokenizer, demos, causal=self.causal).mean(0)

    def fit(self, zoo: Zoo, model, tokenizer, demos: dict[str, list[str]], names: list[str] | None = None) -> ICMLoRA:
        """Train on the zoo's experts (or ``names``); ``demos[name]``: that task's demonstrations."""
        start = time.perf_counter()
        zoo.check_base(model)
        entries = [zoo.entry(n) for n in names] if names else zoo.entries("expert")
        self.names = [e["name"] for e in entries]
        points = [(e["name"], p) for e in entries for p in [None, *(e.get("snapshots", []) if self.snapshots else [])]]
        states = [zoo.state(n, p) for n, p in points]
        self.space = ParamSpace.fit(states, [f"{n}:{p or 'final'}" for n, p in points])
        x = torch.stack([self.space.flatten(s) for s in states])
        self.factors = Factors.fit(x, self.k)
        vectors = torch.stack([self.task_vector(model, tokenizer, demos[n]) for n in self.names])
        self.cond_mean, self.cond_std = vectors.mean(0), vectors.std(0).clamp_min(1e-6)
        cond = self._standard(vectors)[[self.names.index(n) for n, _ in points]]
        self.cvae = train_cvae(self.factors.encode(x), cond, latent=self.latent, steps=self.steps, beta=self.beta,
                               seed=self.seed)
        self.adapter_bytes = sum(t.numel() * 4 for s in states for m in s.tensors.values() for t in m.values())
        self.fit_seconds = time.perf_counter() - start
        return self

    def _standard(self, vector: torch.Tensor) -> torch.Tensor:
        return (vector - self.cond_mean) / self.cond_std

    def generate(self, task_vector: torch.Tensor, sample: bool = False, seed: int = 0):
        """A LoRA AdapterState for the task whose vector is ``task_vector`` (z = 0 unless ``sample``)."""
        z = torch.zeros(1, self.latent)
        if sample:
            z = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            coords = self.cvae.decode(z, self._standard(task_vector).unsqueeze(0))[0]
        return self.space.unflatten(self.factors.decode(coords))

    def nbytes(self) -> int:
        """Bytes the fitted generator keeps (space, factors, CVAE, condition statistics)."""
        return self.space.nbytes() + self.factors.nbytes() + self.cvae.nbytes() + 2 * self.cond_mean.numel() * 4
