"""NEAS-style search over a ``Space`` (after Chen et al., "One-Shot Neural Ensemble Architecture Search by
Diversity-Guided Search Space Shrinking", CVPR 2021, arXiv:2104.00597): diversity-guided shrinking, then an
evolutionary search for K-member ensembles under a parameter budget; random search and the best single adapter
are the baselines. Everything here is pure over ``score(ensemble) -> (accuracy, diversity)``.

Shrinking: each round draws ensembles that fit the budget, scores each choice of each dimension (a member's rank,
its module subset, the split) by the mean over the drawn ensembles that use it of accuracy + lambda x diversity,
and removes the lowest-scoring choice of every dimension that still has several. The official NEAS code holds
only retraining and inference, so this score (potential = mean accuracy, diversity = mean pairwise disagreement,
added with weight lambda) is our reading of the paper, not its code. Evolution: tournament parents, crossover
per member, mutation per gene; ensembles over the budget or already seen are redrawn. Budgets count distinct
ensembles scored (shrinking's draws included), so random search gets the same number.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from .space import Ensemble, Member, Space

Score = Callable[[Ensemble], tuple[float, float]]


@dataclass
class Result:
    """The best ensemble found, its fitness, and every (ensemble, accuracy, diversity) scored, in order."""

    best: Ensemble
    fitness: float
    history: list = field(default_factory=list)


class _Scored:
    """Scores each distinct ensemble once and counts them."""

    def __init__(self, score: Score):
        self.score, self.seen = score, {}

    def __call__(self, e: Ensemble) -> tuple[float, float]:
        if e not in self.seen:
            self.seen[e] = self.score(e)
        return self.seen[e]

    def result(self) -> Result:
        best = max(self.seen, key=lambda e: self.seen[e][0])
        return Result(best, self.seen[best][0], [(e, a, d) for e, (a, d) in self.seen.items()])


def _dims(space: Space) -> list[tuple[str, object]]:
    return [("split", None)] + [(d, k) for k in range(space.k) for d in ("ranks", "modules")]


def _choice(e: Ensemble, dim: str, k) -> object:
    if dim == "split":
        return e.split
    return e.members[k].rank if dim == "ranks" else e.members[k].modules


def _used(space: Space, e: Ensemble, dim: str, k) -> bool:
    """Whether the ensemble's output depends on this gene (members 1.. do not when all blocks are shared)."""
    return dim == "split" or k == 0 or e.split < space.layers


def shrink(space: Space, scored: _Scored, budget: int, rounds: int, samples: int, lam: float,
           rng: random.Random) -> Space:
    """The space after ``rounds`` of diversity-guided shrinking (``samples`` ensembles scored per round)."""
    for _ in range(rounds):
        drawn = {space.sample(rng, budget) for _ in range(samples)}
        value = {e: sum(x * w for x, w in zip(scored(e), (1.0, lam))) for e in drawn}
        for dim, k in _dims(space):
            choices = space.splits if dim == "split" else getattr(space, dim)[k]
            if len(choices) < 2:
                continue
            means = {}
            for c in choices:
                vals = [v for e, v in value.items() if _used(space, e, dim, k) and _choice(e, dim, k) == c]
                if vals:
                    means[c] = sum(vals) / len(vals)
            if len(means) == len(choices):  # only drop a choice when every choice was tried
                worst = min(means, key=means.get)
                smaller = space.without(dim, k, worst)
                if _fits(smaller, budget):
                    space = smaller
    return space


def _fits(space: Space, budget: int) -> bool:
    try:
        space.sample(random.Random(0), budget, tries=200)
        return True
    except ValueError:
        return False


def evolve(space: Space, score: Score, budget: int, evaluations: int, rng: random.Random, population: int = 8,
           shrink_rounds: int = 0, shrink_samples: int = 0, lam: float = 0.5) -> tuple[Result, Space]:
    """Shrink (optional), then evolve; at most ``evaluations`` distinct ensembles scored in all."""
    scored = _Scored(score)
    space.check_budget(budget)
    if shrink_rounds:
        space = shrink(space, scored, budget, shrink_rounds, shrink_samples, lam, rng)
    pool = [e for e in scored.seen if space.contains(e)]
    while len(scored.seen) < evaluations and len(pool) < population:
        e = space.sample(rng, budget)
        scored(e)
        pool.append(e)
    stale = 0
    while len(scored.seen) < evaluations and stale < 200:
        ranked = sorted(pool, key=lambda e: scored(e)[0], reverse=True)[:population]
        a, b = (max(rng.sample(ranked, min(2, len(ranked))), key=lambda e: scored(e)[0]) for _ in range(2))
        child = space.mutate(space.crossover(a, b, rng), rng)
        if child in scored.seen or space.params(child) > budget:
            stale += 1
            continue
        stale = 0
        scored(child)
        pool.append(child)
    return scored.result(), space


def random_search(space: Space, score: Score, budget: int, evaluations: int, rng: random.Random) -> Result:
    """The best of ``evaluations`` distinct ensembles drawn uniformly under the budget."""
    scored = _Scored(score)
    space.check_budget(budget)
    for _ in range(evaluations * 50):
        if len(scored.seen) >= evaluations:
            break
        scored(space.sample(rng, budget))
    return scored.result()


def best_single(space: Space, score: Callable[[Member], float], budget: int) -> tuple[Member, float]:
    """The best one-member adapter (every rank and module subset of member path 0) within the budget."""
    fits = [Member(r, m) for r in space.ranks[0] for m in space.modules[0]
            if space.layers * space.per_block(Member(r, m)) + space.head <= budget]
    scores = {m: score(m) for m in fits}
    best = max(scores, key=scores.get)
    return best, scores[best]
