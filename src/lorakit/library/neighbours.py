"""Weight retrieval that carries over to unseen tasks: an adapter is placed in the text space by its described
weight-neighbours, with a similarity that depends on ΔW only.

Why the learned encoders of ``weights.py`` do not carry over (docs/benchmarks/retrieval.md): their features are
already invariant to LoRA's gauge (x·Aᵀ·Bᵀ = x·ΔWᵀ, and B A = (B R)(R⁻¹ A) leaves ΔW alone), so the gauge is
not the cause; the cause is that a map fitted to a handful of (adapter, text) pairs places those adapters on
their texts and places an adapter of a task it never saw at no useful point. AutoLoRA fits its encoder on
thousands of LoRAs; a library holds tens.

Here the map has one fitted number. Per adapted module, the similarity of two adapters is the cosine of their
output Grams, ⟨ΔW_i ΔW_iᵀ, ΔW_j ΔW_jᵀ⟩_F / (‖ΔW_i ΔW_iᵀ‖_F ‖ΔW_j ΔW_jᵀ‖_F) = ‖P_iᵀ P_j‖²_F / (‖P_iᵀ P_i‖_F
‖P_jᵀ P_j‖_F) with P = s·B·(A Aᵀ)^½ (d_out × r, so ΔW is never formed). It is invariant to the gauge, to the
sign and to the input basis of A (LoRA's random A carries no task information; the output side does), and 0
where an adapter lacks the module. The adapter's similarity is the mean over the modules both adapt. Its
embedding is normalise(Σ_i softmax(k_i / τ) t_i) over the described adapters i (t_i: their descriptions'
MiniLM embeddings). τ is chosen from ``TAUS`` by leave-one-description-out on the described adapters
themselves: each description's adapters are placed by the others alone, and τ maximises the mean reciprocal
rank of their own description among all descriptions. So an adapter of a new task lands between the texts of
the tasks whose updates resemble its own, which is what a text query for it is near when related tasks exist
in the library; it cannot name a task unlike every described one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TAUS = (0.005, 0.01, 0.02, 0.05, 0.1)


def output_factors(stacked: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per module, P = s·B·(A Aᵀ)^½ of each adapter, (N, d_out, r): P Pᵀ = ΔW ΔWᵀ."""
    out = {}
    for path, (a, b) in stacked.items():
        gram = a @ a.transpose(1, 2)  # (N, r, r)
        values, vectors = torch.linalg.eigh(gram.double())
        root = vectors @ torch.diag_embed(values.clamp(min=0).sqrt()) @ vectors.transpose(1, 2)
        out[path] = b.double() @ root
    return out


def similarity(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    """(len(x), len(y)) mean over modules (those both sides adapt) of the output-Gram cosine."""
    total, count = 0.0, 0.0
    for path, px in x.items():
        py = y[path]
        cross = torch.einsum("idr,jds->ijrs", px, py).pow(2).sum((2, 3))  # ‖P_iᵀ P_j‖²
        nx = (px.transpose(1, 2) @ px).flatten(1).norm(dim=1)  # ‖ΔW ΔWᵀ‖_F
        ny = (py.transpose(1, 2) @ py).flatten(1).norm(dim=1)
        present = (nx[:, None] > 0) & (ny[None, :] > 0)
        total = total + torch.where(present, cross / (nx[:, None] * ny[None, :]).clamp(min=1e-300), 0.0)
        count = count + present.double()
    return (total / torch.clamp(count, min=1)).float()


def choose_tau(kernel: torch.Tensor, texts: torch.Tensor) -> float:
    """The τ in ``TAUS`` with the best leave-one-description-out mean reciprocal rank (the first on ties)."""
    groups = torch.unique(texts, dim=0)
    if len(groups) < 3:  # nothing left to rank against when a description is held out: no choice to make
        return TAUS[len(TAUS) // 2]
    member = (texts[:, None, :] == groups[None]).all(-1).float()  # (N, G)
    own = member.argmax(1)
    best, best_score = TAUS[0], -1.0
    for tau in TAUS:
        logits = (kernel / tau).masked_fill(member[:, own].T.bool(), float("-inf"))  # drop own description's adapters
        placed = F.normalize(logits.softmax(1) @ texts, dim=-1)
        scores = placed @ groups.T
        rank = (scores > scores.gather(1, own[:, None])).sum(1) + 1
        score = (1.0 / rank.float()).mean().item()
        if score > best_score + 1e-9:
            best, best_score = tau, score
    return best


class NeighbourEncoder(nn.Module):
    """Stacked adapter factors -> unit vectors: the softmax(k/τ)-weighted mean of the described adapters' texts."""

    def __init__(self, shapes: dict[str, tuple[int, int]], stacked, texts: torch.Tensor):
        super().__init__()
        self.shapes = dict(sorted(shapes.items()))
        self.keys = output_factors({p: stacked[p] for p in self.shapes})
        self.register_buffer("texts", texts.float())
        self.tau = choose_tau(similarity(self.keys, self.keys), self.texts)

    def forward(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        kernel = similarity(output_factors({p: batch[p] for p in self.shapes}), self.keys)
        return F.normalize((kernel / self.tau).softmax(1) @ self.texts, dim=-1)
