"""The conventional recommendation model (CRM) that RecLoRA uses as a lens: matrix factorisation for like / dislike.

logit(u, i) = <p_u, q_i> + b_u + b_i + b, trained with binary cross-entropy on every training event (the full
space, cheap), so it has a representation p_u for every user, including users the language model never saw in
training (Few2Many). Its item vectors q_i also rank a user's history by relevance to a candidate (the short
history of the retriever). Full-batch Adam with weight decay; deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .movielens import Event


class MatrixFactorization(nn.Module):
    """User and item embeddings with biases; ``forward(users, items)`` gives like logits."""

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.1)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user(users) * self.item(items)).sum(-1)
        return dot + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + self.bias


@dataclass
class CRM:
    """A trained matrix factorisation with its id maps (raw MovieLens ids to rows)."""

    model: MatrixFactorization
    user_index: dict[int, int]
    item_index: dict[int, int]

    def users_vectors(self, users: list[int]) -> torch.Tensor:
        """p_u for each user (KeyError naming the user when the CRM never saw it)."""
        unknown = [u for u in users if u not in self.user_index]
        if unknown:
            raise KeyError(f"users {unknown[:5]} have no events in the CRM's training data")
        with torch.no_grad():
            return self.model.user.weight[[self.user_index[u] for u in users]].clone()

    def item_vectors(self, items: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.item.weight[[self.item_index[i] for i in items]].clone()

    def scores(self, events: list[Event]) -> torch.Tensor:
        """Like probabilities for events of known users and items."""
        users = torch.tensor([self.user_index[e.user] for e in events])
        items = torch.tensor([self.item_index[e.item] for e in events])
        with torch.no_grad():
            return torch.sigmoid(self.model(users, items))


def train_crm(events: list[Event], items: list[int], dim: int = 16, epochs: int = 200, lr: float = 0.05,
              weight_decay: float = 1e-4, seed: int = 0) -> CRM:
    """Fit matrix factorisation on ``events`` (full batch); ``items``: every item id the CRM must know."""
    if not events:
        raise ValueError("train_crm needs at least one event")
    user_index = {u: k for k, u in enumerate(sorted({e.user for e in events}))}
    item_index = {i: k for k, i in enumerate(sorted(set(items) | {e.item for e in events}))}
    users = torch.tensor([user_index[e.user] for e in events])
    its = torch.tensor([item_index[e.item] for e in events])
    labels = torch.tensor([float(e.label) for e in events])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MatrixFactorization(len(user_index), len(item_index), dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(users, its), labels)
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return CRM(model, user_index, item_index)
