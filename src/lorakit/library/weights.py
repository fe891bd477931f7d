"""AutoLoRA's weight-encoding retriever: an encoder maps an adapter's weights into the task-text space.

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation"
(arXiv:2508.02107); official code github.com/lzws/AutoLoRA (``retriever.py``, ``train_retriever.py``). There,
each adapted layer has L learned probe vectors x that pass through the LoRA (x Aᵀ Bᵀ), a linear map per layer
type takes them to the text space, a 2-layer transformer and mean pooling give the adapter's embedding, the
text encoder (CLIP) stays frozen, and the loss is the symmetric InfoNCE over a batch of (text, LoRA) pairs.

Here (the design, and where it departs):
- Text side: frozen MiniLM sentence embeddings of the entries' descriptions (``text.py``), as for retrieval by
  description, so one query embedding serves both.
- Weight side: the probes read ΔW from its output side, through its Gram matrix: for module m with
  ΔW = s·B·A, features e_m = diag(Q_mᵀ ΔW ΔWᵀ Q_m) / ‖ΔW‖_F² for L learned unit probes Q_m (columns), computed
  from the factors (ΔW ΔWᵀ = F Fᵀ with F = s·B·R_aᵀ, A = (Q_a R_a)ᵀ; never d_out × d_in). Why not x Aᵀ Bᵀ: LoRA's
  A starts random and moves little, so the input side of ΔW differs between two adapters of one task trained
  from different seeds, and a probe through it changes sign and mixes directions from seed to seed; the
  output-side Gram is the same up to noise (ΔW ≈ -η G AᵀA, so ΔW ΔWᵀ ∝ G Gᵀ on average over A). AutoLoRA
  learns such invariances from thousands of LoRAs; a library holds tens. Dividing by ‖ΔW‖_F² removes the
  scale that learning rate and step count set.
- Pooling: the per-module features are concatenated (the module path plays the role of AutoLoRA's position
  embedding) and a two-layer MLP maps them to the text space: a transformer does not fit on tens of entries.
- Loss: symmetric InfoNCE on cosine similarities at temperature ``tau`` (AutoLoRA: temperature 1 and the loss
  × 10); entries that share a description are all positives of that text (soft targets).
- Methods whose update is not low-rank use their dense ΔW (``AdapterState.delta``); one that needs the base
  weights for ΔW (DoRA) is refused, naming the entry.
Training is full-batch AdamW for ``steps`` steps from a seeded initialisation, so the same library and seed
give the same encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.state import AdapterState

Factors = dict[str, torch.Tensor]  # module path -> F (d_out × k) with ΔW ΔWᵀ = F Fᵀ


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of the weight encoder and its training."""

    probes: int = 8  # L, probe vectors per module
    hidden: int = 256
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    tau: float = 0.1
    seed: int = 0


def gram_factors(state: AdapterState, where: str) -> Factors:
    """Per module, F with ΔW ΔWᵀ = F Fᵀ (float32); ``where`` names the adapter in errors."""
    out = {}
    for path in state.modules():
        factors = state.low_rank(path)
        if factors is not None and factors[0].dim() == 2:
            a, b, scale = factors
            r_a = torch.linalg.qr(a.float().T, mode="reduced").R  # Aᵀ = Q_a R_a, so ΔW = s B R_aᵀ Q_aᵀ
            out[path] = scale * b.float() @ r_a.T
            continue
        try:
            delta = state.delta(path).float()
        except Exception as e:
            raise ValueError(f"{where}: module '{path}': ΔW of method '{state.config.method_name}' cannot be read "
                             f"from the adapter alone ({e}); weight retrieval needs it") from None
        out[path] = delta.reshape(delta.shape[0], -1)
    return out


class WeightEncoder(nn.Module):
    """Adapter factors -> a unit vector in the text-embedding space."""

    def __init__(self, shapes: dict[str, int], dim: int, config: EncoderConfig):
        super().__init__()
        self.paths = sorted(shapes)
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(shapes[p], config.probes)) for p in self.paths])
        self.mlp = nn.Sequential(nn.Linear(len(self.paths) * config.probes, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, dim))

    def features(self, factors: Factors) -> torch.Tensor:
        """Probe energies of every module, (modules × L,); zeros for a module the adapter does not adapt."""
        out = []
        for path, q in zip(self.paths, self.probes):
            f = factors.get(path)
            if f is None or f.shape[0] != q.shape[0]:
                out.append(q.new_zeros(q.shape[1]))
                continue
            energy = (F.normalize(q, dim=0).T @ f).pow(2).sum(1)  # diag(Qᵀ ΔW ΔWᵀ Q), (L,)
            out.append(energy / f.pow(2).sum().clamp(min=1e-12))
        return torch.cat(out)

    def forward(self, batch: list[Factors]) -> torch.Tensor:
        feats = torch.stack([self.features(f) for f in batch])
        return F.normalize(self.mlp(feats * len(self.paths)), dim=-1)


def info_nce(weights: torch.Tensor, texts: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE; every pair whose texts are the same counts as a positive."""
    logits = weights @ texts.T / tau
    same = (texts @ texts.T > 1 - 1e-6).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.log_softmax(0).T).sum(1).mean())


def train_encoder(factors: list[Factors], texts: torch.Tensor, config: EncoderConfig = EncoderConfig()) -> WeightEncoder:
    """An encoder fitted so that each adapter's embedding is nearest its own text's among ``texts``."""
    if len({tuple(t.tolist()) for t in texts}) < 2:
        raise ValueError("weight retrieval needs entries with at least two different descriptions to learn from")
    shapes = {}
    for f in factors:
        for path, t in f.items():
            shapes.setdefault(path, t.shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = WeightEncoder(shapes, texts.shape[1], config)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        opt.zero_grad()
        loss = info_nce(encoder(factors), texts, config.tau)
        loss.backward()
        opt.step()
    return encoder.eval()
