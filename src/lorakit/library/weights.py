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
        self.shapes = {p: shapes[p] for p in self.paths}
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(shapes[p], config.probes)) for p in self.paths])
        self.mlp = nn.Sequential(nn.Linear(len(self.paths) * config.probes, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, dim))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit embeddings of a ``stack``-ed batch: probe energies of every module through the MLP."""
        feats = []
        for path, q in zip(self.paths, self.probes):
            f = batch[path]  # (N, d_out, k); zeros where an adapter leaves the module alone
            energy = (F.normalize(q, dim=0).T @ f).pow(2).sum(-1)  # diag(Qᵀ ΔW ΔWᵀ Q), (N, L)
            feats.append(energy / f.pow(2).sum((1, 2)).clamp(min=1e-12).unsqueeze(1))
        return F.normalize(self.mlp(torch.cat(feats, 1) * len(self.paths)), dim=-1)


def stack(factors: list[Factors], shapes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per module path, the adapters' F padded to one width, (N, d_out, k); zeros for a module an adapter lacks
    (or has at another size). Extra zero columns leave F Fᵀ unchanged."""
    out = {}
    for path, d_out in shapes.items():
        found = [f.get(path) for f in factors]
        found = [t if t is not None and t.shape[0] == d_out else None for t in found]
        k = max((t.shape[1] for t in found if t is not None), default=1)
        out[path] = torch.stack([F.pad(t, (0, k - t.shape[1])) if t is not None else torch.zeros(d_out, k)
                                 for t in found])
    return out


def shapes_of(factors: list[Factors]) -> dict[str, int]:
    """Each module path's d_out, as the first adapter that adapts it has it."""
    shapes = {}
    for f in factors:
        for path, t in f.items():
            shapes.setdefault(path, t.shape[0])
    return shapes


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
    shapes = shapes_of(factors)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = WeightEncoder(shapes, texts.shape[1], config)
    batch = stack(factors, shapes)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        opt.zero_grad()
        loss = info_nce(encoder(batch), texts, config.tau)
        loss.backward()
        opt.step()
    return encoder.eval()
