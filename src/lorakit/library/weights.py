"""AutoLoRA's weight-encoding retriever: an encoder maps an adapter's weights into the task-text space.

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation"
(arXiv:2508.02107); official code github.com/lzws/AutoLoRA (``retriever.py``, ``train_retriever.py``). There,
each adapted layer has L learned probe vectors x that pass through the LoRA (x Aᵀ Bᵀ), a linear map per layer
type takes each result to the text space, a position embedding marks the layer, a 2-layer transformer and mean
pooling give the adapter's embedding; the text encoder (CLIP) stays frozen; the loss is the symmetric InfoNCE
over a batch of (text, LoRA) pairs.

The default encoder is not this one but ``neighbours.py`` (``probe="neighbours"``): fitted on a library's tens
of adapters, the learned encoders below find undescribed adapters of tasks they were fitted on, not of new tasks
(docs/benchmarks/retrieval.md). The learned ones, AutoLoRA's design and where it departs:
- Text side: frozen MiniLM sentence embeddings of the entries' descriptions (``text.py``), as for retrieval by
  description, so one query embedding serves both.
- Weight side, ``probe="input"`` (AutoLoRA's): per module, y = x·Aᵀ·(s·B)ᵀ / ‖ΔW‖_F for L learned
  unit probes x (computed from the factors, never d_out × d_in); a linear map per module type (the path's last
  name) to ``hidden``, plus a learned position per module; the tokens are averaged, then GELU and a linear map
  to the text space. Dividing by ‖ΔW‖_F removes the scale that learning rate and step count set. No transformer:
  a library holds tens of adapters, not AutoLoRA's thousands.
- ``probe="gram"``: a variant that reads ΔW from its output side only, e = diag(Qᵀ ΔW ΔWᵀ Q) / ‖ΔW‖_F², which
  is invariant to the sign and input basis of A (motivated by LoRA's random A). On real MiniLM adapters it
  found undescribed adapters less often than AutoLoRA's probe (docs/benchmarks/retrieval.md), so it is not the
  default. On constructed adapters whose task lives only in B (A random) it finds them all, AutoLoRA's probe
  two thirds (tests/library).
- Loss: symmetric InfoNCE on cosine similarities at temperature ``tau`` (AutoLoRA: temperature 1 and the loss
  × 10); entries that share a description are all positives of that text (soft targets).
- Methods whose update is not low-rank use their dense ΔW (A = I); one that needs the base weights for ΔW
  (DoRA) is refused, naming the entry.
Training is full-batch AdamW for ``steps`` steps from a seeded initialisation, so the same library and seed
give the same encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.state import AdapterState
from .neighbours import NeighbourEncoder

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r × d_in), s·B (d_out × r))
PROBES = ("neighbours", "input", "gram")


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of the weight encoder and its training."""

    probe: str = "neighbours"  # neighbours.py; learned: "input" (AutoLoRA's x·Aᵀ·Bᵀ), "gram" (diag(Qᵀ ΔW ΔWᵀ Q))
    probes: int = 8  # L, probe vectors per module
    hidden: int = 256
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    tau: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, not {self.probe!r}")


def factors(state: AdapterState, where: str) -> Factors:
    """Per module, (A, s·B) in float32 with ΔW = s·B·A; ``where`` names the adapter in errors."""
    out = {}
    for path in state.modules():
        low = state.low_rank(path)
        if low is not None and low[0].dim() == 2:
            out[path] = (low[0].float(), low[2] * low[1].float())
            continue
        try:
            delta = state.delta(path).float()
        except Exception as e:
            raise ValueError(f"{where}: module '{path}': ΔW of method '{state.config.method_name}' cannot be read "
                             f"from the adapter alone ({e}); weight retrieval needs it") from None
        delta = delta.reshape(delta.shape[0], -1)
        out[path] = (torch.eye(delta.shape[1]), delta)
    return out


def stack(batch: list[Factors], shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path, every adapter's (A, s·B) zero-padded to one rank, (N, r, d_in) and (N, d_out, r); zeros
    for a module an adapter lacks or has at another size. Zero rows of A / columns of B leave ΔW unchanged."""
    out = {}
    for path, (d_out, d_in) in shapes.items():
        found = [f.get(path) for f in batch]
        found = [x if x is not None and (x[1].shape[0], x[0].shape[1]) == (d_out, d_in) else None for x in found]
        r = max((x[0].shape[0] for x in found if x is not None), default=1)
        a = torch.stack([F.pad(x[0], (0, 0, 0, r - x[0].shape[0])) if x else torch.zeros(r, d_in) for x in found])
        b = torch.stack([F.pad(x[1], (0, r - x[1].shape[1])) if x else torch.zeros(d_out, r) for x in found])
        out[path] = (a, b)
    return out


def shapes_of(batch: list[Factors]) -> dict[str, tuple[int, int]]:
    """Each module path's (d_out, d_in), as the first adapter that adapts it has it."""
    shapes = {}
    for f in batch:
        for path, (a, b) in f.items():
            shapes.setdefault(path, (b.shape[0], a.shape[1]))
    return dict(sorted(shapes.items()))


class WeightEncoder(nn.Module):
    """Stacked adapter factors -> unit vectors in the text-embedding space."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dim: int, config: EncoderConfig):
        super().__init__()
        self.shapes, self.kind = dict(sorted(shapes.items())), config.probe
        side = 1 if self.kind == "input" else 0  # input probes live in d_in, Gram probes in d_out
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(s[side], config.probes)) for s in self.shapes.values()])
        widths = {p.rsplit(".", 1)[-1]: (s[0] if self.kind == "input" else config.probes) for p, s in self.shapes.items()}
        self.project = nn.ModuleDict({k: nn.Linear(w, config.hidden) for k, w in widths.items()})
        self.position = nn.Parameter(torch.zeros(len(self.shapes), 1, config.hidden))
        self.head = nn.Sequential(nn.GELU(), nn.Linear(config.hidden, dim))

    def forward(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        tokens = []
        for (path, probe), pos in zip(zip(self.shapes, self.probes), self.position):
            a, b = batch[path]  # (N, r, d_in), (N, d_out, r)
            norm = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2)).clamp(min=1e-24).sqrt()  # ‖ΔW‖_F
            probe = F.normalize(probe, dim=0)
            if self.kind == "input":
                feats = (probe.T @ a.transpose(1, 2)) @ b.transpose(1, 2)  # x·Aᵀ·Bᵀ, (N, L, d_out)
                feats = feats / norm[:, None, None]
            else:
                feats = ((probe.T @ b) @ a).pow(2).sum(-1) / norm[:, None] ** 2  # diag(Qᵀ ΔW ΔWᵀ Q), (N, L)
                feats = feats.unsqueeze(1)
            tokens.append(self.project[path.rsplit(".", 1)[-1]](feats) + pos)
        return F.normalize(self.head(torch.cat(tokens, 1).mean(1)), dim=-1)


def info_nce(weights: torch.Tensor, texts: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE; every pair whose texts are the same counts as a positive."""
    logits = weights @ texts.T / tau
    same = (texts @ texts.T > 1 - 1e-6).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.log_softmax(0).T).sum(1).mean())


def train_encoder(batch: list[Factors], texts: torch.Tensor, config: EncoderConfig = EncoderConfig()) -> WeightEncoder:
    """An encoder fitted so that each adapter's embedding is nearest its own text's among ``texts``."""
    if len({tuple(t.tolist()) for t in texts}) < 2:
        raise ValueError("weight retrieval needs entries with at least two different descriptions to learn from")
    shapes = shapes_of(batch)
    if config.probe == "neighbours":
        return NeighbourEncoder(shapes, stack(batch, shapes), texts).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = WeightEncoder(shapes, texts.shape[1], config)
    stacked = stack(batch, shapes)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        opt.zero_grad()
        info_nce(encoder(stacked), texts, config.tau).backward()
        opt.step()
    return encoder.eval()
