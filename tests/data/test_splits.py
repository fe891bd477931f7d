"""Seeded splitting and stratified subsampling."""

from collections import Counter

from lorakit.data.splits import carve, stable_permutation, subsample


def test_stable_permutation_is_fixed_by_the_seed():
    assert sorted(stable_permutation(50, 3)) == list(range(50))
    assert stable_permutation(50, 3) == stable_permutation(50, 3)
    assert stable_permutation(50, 3) != stable_permutation(50, 4)
    # pinned so a change of algorithm (which would move every bundled split) cannot go unnoticed
    assert stable_permutation(8, 1234) == [2, 3, 0, 5, 6, 4, 1, 7]


def test_carve_partitions_the_examples():
    examples = [{"i": i} for i in range(100)]
    test, validation, train = carve(examples, [0.1, 0.2], seed=0)
    assert (len(test), len(validation), len(train)) == (10, 20, 70)
    ids = [e["i"] for part in (test, validation, train) for e in part]
    assert sorted(ids) == list(range(100))
    assert [e["i"] for e in train] == sorted(e["i"] for e in train)


def test_subsample_keeps_class_shares():
    examples = [{"label": 0}] * 600 + [{"label": 1}] * 300 + [{"label": 2}] * 100
    examples = [dict(e, i=i) for i, e in enumerate(examples)]
    picked = subsample(examples, 100, seed=5, stratify_by="label")
    assert len(picked) == 100
    assert Counter(e["label"] for e in picked) == {0: 60, 1: 30, 2: 10}
    assert picked == subsample(examples, 100, seed=5, stratify_by="label")
    assert picked != subsample(examples, 100, seed=6, stratify_by="label")


def test_subsample_uneven_quotas_sum_to_k():
    examples = [{"label": i % 3, "i": i} for i in range(10)]
    assert len(subsample(examples, 7, seed=0, stratify_by="label")) == 7
    assert len(subsample(examples, 7, seed=0)) == 7
    assert subsample(examples, None, seed=0) == examples
    assert subsample(examples, 50, seed=0) == examples
