"""RecLoRA's long-short modality retriever: a long history for the ID modality, a short one for the text prompt.

The ID modality (the CRM, `crm.py`) sees a user's whole training history through its user vector. The text
modality sees only ``k`` past events, so the prompt stays short: the ``k`` most relevant to the candidate by the
cosine of the CRM's item vectors (``"relevant"``, RecLoRA's retrieval) or simply the ``k`` latest (``"recent"``),
listed oldest first with whether the user liked each.
"""
from __future__ import annotations

import torch

from .crm import CRM
from .movielens import Event, Movie

STRATEGIES = ("relevant", "recent")


def short_history(history: list[Event], candidate: int, k: int, crm: CRM | None = None,
                  strategy: str = "relevant") -> list[Event]:
    """Up to ``k`` events of ``history`` for the prompt, in time order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, found {k}")
    if len(history) <= k or k == 0:
        return list(history[len(history) - k:]) if k else []
    if strategy == "recent":
        return list(history[-k:])
    if crm is None:
        raise ValueError("strategy 'relevant' ranks past items by the CRM's item vectors: pass crm=")
    past = torch.nn.functional.normalize(crm.item_vectors([e.item for e in history]), dim=-1)
    target = torch.nn.functional.normalize(crm.item_vectors([candidate]), dim=-1)[0]
    keep = sorted(torch.topk(past @ target, k).indices.tolist())  # back to time order
    return [history[j] for j in keep]


def prompt(movies: dict[int, Movie], shown: list[Event], candidate: int) -> str:
    """The text the language model classifies: the short history, then the candidate with its genres."""
    seen = "; ".join(f"{movies[e.item].title} ({'liked' if e.label else 'disliked'})" for e in shown) or "nothing yet"
    movie = movies[candidate]
    return f"Watched: {seen}. Candidate: {movie.title} ({', '.join(movie.genres)}). Will the user like it?"
