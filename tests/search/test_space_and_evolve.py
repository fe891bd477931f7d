"""The ensemble search space (parameter count, budget refusal) and the searches over it, on a toy objective."""
import random
import statistics

import pytest

from lorakit.search import BudgetError, Ensemble, Member, best_single, build_space, evolve, random_search, shrink
from lorakit.search.evolve import _Scored

SIZES = {"query": 128, "value": 128, "dense": 320}


def toy_space(k=3, layers=4):
    return build_space(k, layers, [1, 2, 4, 8, 16], ["query", "value", "dense"], SIZES, head=195)


def test_parameters_by_hand():
    space = toy_space()
    e = Ensemble(1, (Member(2, ("query",)), Member(4, ("query", "dense")), Member(1, ("value",))))
    shared = 1 * 2 * 128
    own = 3 * (2 * 128 + 4 * (128 + 320) + 1 * 128)
    assert space.params(e) == shared + own + 3 * 195
    everything_shared = Ensemble(4, (Member(2, ("query",)),) * 3)
    assert space.params(everything_shared) == 4 * 2 * 128 + 3 * 195
    assert space.canonical(Ensemble(4, (Member(2, ("query",)), Member(8, ("dense",)), Member(1, ("value",))))) \
        == everything_shared


def test_budget_too_small_is_refused_naming_budget_and_minimum():
    space = toy_space()
    one, ensemble = space.minimum()
    assert one == 4 * 128 + 195 and ensemble == 4 * 128 + 3 * 195
    space.check_budget(ensemble)
    with pytest.raises(BudgetError, match=rf"--budget {ensemble - 1:,} .* member in this space needs {one:,} .* "
                                          rf"ensemble {ensemble:,}"):
        space.check_budget(ensemble - 1)
    called = []
    with pytest.raises(BudgetError):
        evolve(space, lambda e: called.append(e) or (0.0, 0.0), ensemble - 1, 10, random.Random(0))
    assert not called  # refused before anything is scored


def toy_score(space):
    """Accuracy rises with each member's rank and modules up to a size, and with how different the members are."""
    def score(e):
        parts = []
        for m in e.members:
            p = space.per_block(m)
            parts.append(0.5 + 0.1 * len(m.modules) + 0.05 * (m.rank.bit_length()) - 1e-4 * abs(p - 900))
        distinct = len(set(e.members)) / len(e.members)
        return statistics.mean(parts) + 0.05 * distinct, distinct
    return score


@pytest.mark.parametrize("shrink_rounds", [0, 2])
def test_search_respects_the_budget_and_evolution_beats_random(shrink_rounds):
    space = toy_space()
    budget = 12_000
    score = toy_score(space)
    gaps = []
    for seed in range(10):
        neas, shrunk = evolve(space, score, budget, 60, random.Random(seed), shrink_rounds=shrink_rounds,
                              shrink_samples=12)
        rand = random_search(space, score, budget, 60, random.Random(seed + 100))
        assert len(neas.history) <= 60 and len(rand.history) == 60
        assert all(space.params(e) <= budget for e, _, _ in neas.history + rand.history)
        if shrink_rounds:
            size = lambda s: len(s.splits) + sum(map(len, s.ranks)) + sum(map(len, s.modules))  # noqa: E731
            assert size(shrunk) < size(space)  # the space shrank
        gaps.append(neas.fitness - rand.fitness)
    assert gaps[0] >= 0  # the fixed seed
    assert statistics.mean(gaps) > 0 and sum(g > 0 for g in gaps) > sum(g < 0 for g in gaps)


def test_shrinking_drops_the_worst_choice_of_each_dimension():
    space = build_space(2, 2, [1, 4], ["query", "value"], SIZES, head=10)
    # accuracy only likes rank 4; diversity only likes split 0
    score = lambda e: (sum(m.rank == 4 for m in e.members) / 2, float(e.split == 0))  # noqa: E731
    small = shrink(space, _Scored(score), 10**9, rounds=1, samples=200, lam=0.5, rng=random.Random(0))
    assert small.ranks == ((4,), (4,)) and 2 not in small.splits


def test_best_single_is_the_best_adapter_within_the_budget():
    space = toy_space()
    score = lambda m: m.rank + len(m.modules)  # noqa: E731
    budget = 4 * 4 * (128 + 320) + 195
    best, value = best_single(space, score, budget)
    assert space.layers * space.per_block(best) + space.head <= budget
    assert value == max(score(Member(r, m)) for r in space.ranks[0] for m in space.modules[0]
                        if space.layers * space.per_block(Member(r, m)) + space.head <= budget)
