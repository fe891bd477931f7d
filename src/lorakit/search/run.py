"""The ``search-ensemble`` pipeline: space and budget check (before any training), the base's prefix computed once,
the super-adapter trained one-shot, NEAS against random search at equal budget and the best single adapter, and
the chosen members written as PEFT directories plus a calibrated cascade spec."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from .evolve import best_single, evolve, random_search
from .space import Space, build_space
from .supernet import Evaluator, SuperAdapter


@dataclass(frozen=True)
class SearchConfig:
    """Settings of one search (the CLI's flags)."""

    members: int = 3
    budget: int = 100_000
    layers: int = 2
    targets: tuple[str, ...] = ("query", "value")
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    alpha: float = 16.0
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    evaluations: int = 40
    shrink_rounds: int = 2
    shrink_samples: int = 10
    diversity_weight: float = 0.5
    seed: int = 0


@dataclass
class SearchOutcome:
    """What a search found, with the super-adapter and evaluators to export or score it further."""

    space: Space
    shrunk: Space
    sup: SuperAdapter
    neas: object
    random: object
    single: tuple
    losses: list
    val: Evaluator
    extra: dict = field(default_factory=dict)


def space_for(model, config: SearchConfig) -> Space:
    """The full search space on ``model``'s top ``config.layers`` blocks (sizes read from the model)."""
    from ..train.schedules.lisa import find_layers

    path, blocks = find_layers(model)
    if not 1 <= config.layers <= len(blocks):
        raise ValueError(f"--layers {config.layers}: the model has {len(blocks)} blocks; search 1 to {len(blocks)}")
    top = f"{path}.{len(blocks) - 1}."
    sizes = {}
    for kind in config.targets:
        found = [m for p, m in model.named_modules() if p.startswith(top) and (p.endswith("." + kind))
                 and isinstance(m, torch.nn.Linear)]
        if len(found) != 1:
            names = sorted({p[len(top):] for p, m in model.named_modules() if p.startswith(top) and isinstance(m, torch.nn.Linear)})
            raise ValueError(f"--targets {kind}: expected one linear module per block ending in '{kind}', found "
                             f"{len(found)}; the block's linear modules: {', '.join(names)}")
        sizes[kind] = found[0].in_features + found[0].out_features
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected a sequence classifier with a linear 'classifier' or 'score' head")
    if max(config.ranks) < 1 or min(config.ranks) < 1:
        raise ValueError(f"--ranks {list(config.ranks)}: ranks must be >= 1")
    n_head = head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    return build_space(config.members, config.layers, list(config.ranks), list(config.targets), sizes, n_head)


def encode_fixed(examples: list[dict], tokenizer, max_length: int) -> dict:
    """input_ids / attention_mask padded to ``max_length`` and labels, as tensors."""
    enc = tokenizer([e["text"] for e in examples], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e["label"] for e in examples])}


def batches(data: dict, size: int = 64, keys=("input_ids", "attention_mask", "labels")) -> list[dict]:
    """``data`` cut into batches of ``size`` rows."""
    return [{k: data[k][i:i + size] for k in keys} for i in range(0, len(data["labels"]), size)]


def with_prefix(sup: SuperAdapter, data: dict, batch_size: int = 64) -> dict:
    """``data`` plus the base's hidden states entering the first searched block."""
    parts = [sup.prefix(b) for b in batches(data, batch_size, ("input_ids", "attention_mask"))]
    return {**data, "prefix": None if parts[0] is None else torch.cat(parts)}


def search(model, train: dict, val: dict, config: SearchConfig, space: Optional[Space] = None) -> SearchOutcome:
    """Train the super-adapter on ``train`` and search on ``val`` (``encode_fixed`` dicts; a ``prefix`` entry, the
    base's hidden states entering the first searched block, is computed when missing)."""
    space = space or space_for(model, config)
    space.check_budget(config.budget)  # before any training
    torch.manual_seed(config.seed)
    sup = SuperAdapter(model, space, max(config.ranks), config.alpha, seed=config.seed)
    train, val = (d if "prefix" in d else with_prefix(sup, d) for d in (train, val))
    scorer = Evaluator(sup, val)
    losses = sup.train(train, config.steps, config.batch_size, config.lr, config.seed)
    neas, shrunk = evolve(space, scorer.score, config.budget, config.evaluations, random.Random(config.seed),
                          shrink_rounds=config.shrink_rounds, shrink_samples=config.shrink_samples,
                          lam=config.diversity_weight)
    rand = random_search(space, scorer.score, config.budget, config.evaluations, random.Random(config.seed + 1))
    single = best_single(space, scorer.single, config.budget)
    return SearchOutcome(space, shrunk, sup, neas, rand, single, losses, scorer)
