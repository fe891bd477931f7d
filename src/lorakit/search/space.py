"""The adapter-ensemble search space: K members, each a (rank, module subset) on the searched blocks, with the
blocks below a split point shared by all members (they run member 0's adapter there), and one head per member.

Parameters of an ensemble = split x P(member 0) + sum over members of (layers - split) x P(member) + K x head, where
P(member) = rank x sum of (in + out) over its module kinds in one block: the scalars its PEFT files hold.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Member:
    """One member's adapter on each of its own blocks: a rank and the module kinds it adapts."""

    rank: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Ensemble:
    """K members; the searched blocks below ``split`` run member 0's adapter for every member."""

    split: int
    members: tuple[Member, ...]


class BudgetError(ValueError):
    """A parameter budget that no ensemble of the space fits."""


@dataclass(frozen=True)
class Space:
    """Choices per dimension (ranks and module subsets per member path, split points) and the parameter sizes."""

    layers: int
    ranks: tuple[tuple[int, ...], ...]
    modules: tuple[tuple[tuple[str, ...], ...], ...]
    splits: tuple[int, ...]
    sizes: tuple[tuple[str, int], ...]  # module kind -> in + out features
    head: int

    @property
    def k(self) -> int:
        return len(self.ranks)

    def per_block(self, m: Member) -> int:
        size = dict(self.sizes)
        return m.rank * sum(size[t] for t in m.modules)

    def params(self, e: Ensemble) -> int:
        """Stored scalars of the ensemble's adapters and heads."""
        own = sum(self.per_block(m) for m in e.members) * (self.layers - e.split)
        return e.split * self.per_block(e.members[0]) + own + self.k * self.head

    def canonical(self, e: Ensemble) -> Ensemble:
        """The same ensemble with the genes that cannot matter (members 1.. when everything is shared) fixed."""
        if e.split == self.layers:
            return Ensemble(e.split, (e.members[0],) * self.k)
        return e

    def minimum(self) -> tuple[int, int]:
        """(smallest one-member adapter, smallest K-member ensemble) in parameters."""
        small = min(self.per_block(Member(r, m)) for r in self.ranks[0] for m in self.modules[0])
        return self.layers * small + self.head, self.layers * small + self.k * self.head

    def check_budget(self, budget: int) -> None:
        """Refuse (BudgetError) a budget below the smallest K-member ensemble, naming both minimums."""
        one, ensemble = self.minimum()
        if budget < ensemble:
            raise BudgetError(f"--budget {budget:,} parameters is too small: the smallest member in this space needs "
                              f"{one:,} and the smallest {self.k}-member ensemble {ensemble:,} (all {self.layers} "
                              "searched blocks shared at the lowest rank, one head each); raise --budget or lower --members")

    def sample(self, rng: random.Random, budget: Optional[int] = None, tries: int = 1000) -> Ensemble:
        """A uniform draw per dimension, redrawn until it fits ``budget``."""
        for _ in range(tries):
            e = self.canonical(Ensemble(rng.choice(self.splits), tuple(
                Member(rng.choice(self.ranks[k]), rng.choice(self.modules[k])) for k in range(self.k))))
            if budget is None or self.params(e) <= budget:
                return e
        raise BudgetError(f"no ensemble within {budget:,} parameters found in {tries} draws; raise --budget")

    def mutate(self, e: Ensemble, rng: random.Random, p: float = 0.3) -> Ensemble:
        """Each gene moved to a neighbouring choice with probability ``p`` (at least one): the next rank or split
        up or down, one module kind added or removed."""
        genes = [("split", None)] + [(d, k) for k in range(self.k) for d in ("rank", "modules")]
        chosen = [g for g in genes if rng.random() < p] or [rng.choice(genes)]
        split, members = e.split, list(e.members)
        for dim, k in chosen:
            if dim == "split":
                split = _step(self.splits, split, rng)
            elif dim == "rank":
                members[k] = dataclasses.replace(members[k], rank=_step(self.ranks[k], members[k].rank, rng))
            else:
                near = [c for c in self.modules[k] if len(set(c) ^ set(members[k].modules)) == 1]
                members[k] = dataclasses.replace(members[k], modules=rng.choice(near or list(self.modules[k])))
        return self.canonical(Ensemble(split, tuple(members)))

    def crossover(self, a: Ensemble, b: Ensemble, rng: random.Random) -> Ensemble:
        """Each member (and the split) taken from either parent."""
        members = tuple(rng.choice((x, y)) for x, y in zip(a.members, b.members))
        return self.canonical(Ensemble(rng.choice((a.split, b.split)), members))

    def contains(self, e: Ensemble) -> bool:
        return e.split in self.splits and all(
            m.rank in self.ranks[k] and m.modules in self.modules[k] for k, m in enumerate(e.members))

    def without(self, dim: str, k: Optional[int], choice) -> "Space":
        """The space with one choice removed from one dimension."""
        if dim == "split":
            return dataclasses.replace(self, splits=tuple(c for c in self.splits if c != choice))
        field = list(getattr(self, dim))
        field[k] = tuple(c for c in field[k] if c != choice)
        return dataclasses.replace(self, **{dim: tuple(field)})

    def describe(self, e: Ensemble) -> dict:
        return {"split": e.split, "params": self.params(e),
                "members": [{"rank": m.rank, "modules": list(m.modules)} for m in e.members]}


def _step(choices: tuple, value, rng: random.Random):
    """A neighbour of ``value`` among the sorted ``choices`` (any choice when ``value`` is not one of them)."""
    ordered = sorted(choices)
    if value not in ordered:
        return rng.choice(ordered)
    i = ordered.index(value)
    near = [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    return rng.choice(near or ordered)


def subsets(kinds: list[str]) -> tuple[tuple[str, ...], ...]:
    """Every non-empty subset of the module kinds, in a fixed order."""
    out = []
    for mask in range(1, 1 << len(kinds)):
        out.append(tuple(t for i, t in enumerate(kinds) if mask >> i & 1))
    return tuple(out)


def build_space(k: int, layers: int, ranks: list[int], kinds: list[str], sizes: dict[str, int], head: int) -> Space:
    """The full space: every rank and every non-empty module subset for each member, every split 0..layers."""
    if k < 1 or layers < 1 or not ranks or not kinds:
        raise ValueError(f"the search space needs members >= 1, layers >= 1, ranks and module kinds; found k={k}, "
                         f"layers={layers}, ranks={ranks}, kinds={kinds}")
    subs = subsets(kinds)
    return Space(layers, (tuple(sorted(ranks)),) * k, (subs,) * k, tuple(range(layers + 1)) if k > 1 else (layers,),
                 tuple(sorted(sizes.items())), head)
