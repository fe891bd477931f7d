"""Adapters as Flower records, their byte counts, update checks and the Dirichlet split."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorakit.federated.checks import problems
from lorakit.federated.conformance import SHAPES, synthetic_clients
from lorakit.federated.partition import dirichlet_split, label_histogram
from lorakit.federated.records import config_from_record, config_record, from_arrays, payload, to_arrays


def test_state_round_trips_through_an_array_record():
    state = synthetic_clients([4], head=True)[0]
    back = from_arrays(to_arrays(state), state.config)
    for group in ("tensors", "modules_to_save"):
        want, got = getattr(state, group), getattr(back, group)
        assert set(got) == set(want)
        for p in want:
            assert all(torch.equal(got[p][k], want[p][k]) for k in want[p])
    assert config_from_record(config_record(state.config)) == state.config


def test_skipped_tensors_do_not_travel():
    state = synthetic_clients([4])[0]
    keys = list(to_arrays(state, skip=["lora_A.weight"]).keys())
    assert keys and all("lora_B.weight" in k for k in keys)


def test_malformed_record_keys_are_named():
    record = to_arrays(synthetic_clients([4])[0])
    record["lora_A.weight"] = record["t/enc.q/lora_A.weight"]
    with pytest.raises(ValueError, match="'lora_A.weight' is not"):
        from_arrays(record, synthetic_clients([4])[0].config)


def test_payload_counts_four_bytes_per_parameter_plus_headers():
    state = synthetic_clients([8])[0]
    size = payload(to_arrays(state))
    params = sum(8 * (i + o) for o, i in SHAPES.values())
    assert size["params"] == params and size["tensors"] == 4 * params
    # Flower counts the serialised arrays (a .npy header each) and the key strings on top
    assert 4 * params < size["wire"] < 4 * params + 256 * len(SHAPES) * 2


def _corrupt(state, path, key, fn):
    bad = state.clone()
    bad.tensors[path][key] = fn(bad.tensors[path][key])
    return bad


@pytest.mark.parametrize("fault,expected", [
    (lambda s: _corrupt(s, "enc.q", "lora_B.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "NaN/inf"),
    (lambda s: _corrupt(s, "enc.v", "lora_A.weight", lambda t: t.index_fill(1, torch.tensor([2]), float("inf"))), "NaN/inf"),
    (lambda s: _corrupt(s, "enc.q", "lora_A.weight", lambda t: t[:, :-1]), r"shape \(4, 15\), expected \(4, 16\)"),
    (lambda s: _corrupt(s, "enc.q", "lora_A.weight", lambda t: t[:2]), r"shape \(2, 16\), expected \(4, 16\)"),
    (lambda s: type(s)(s.config, {**s.tensors, "enc.k": s.tensors["enc.q"]}), "outside the agreed targets: enc.k"),
    (lambda s: type(s)(s.config, {"enc.q": s.tensors["enc.q"]}), "modules missing: enc.v"),
    (lambda s: type(s)(s.config, {**s.tensors, "enc.q": {**s.tensors["enc.q"], "lora_C": torch.ones(2)}}), "tensors"),
])
def test_bad_updates_are_named(fault, expected):
    good = synthetic_clients([4])[0]
    assert problems(good, good) == []
    found = problems(fault(good), good)
    assert found and any(__import__("re").search(expected, p) for p in found), found


def test_other_ranks_pass_only_where_the_strategy_allows_them():
    wide, narrow = synthetic_clients([8, 4])
    assert problems(narrow, wide, mixed_ranks=False)
    assert problems(narrow, wide, mixed_ranks=True) == []
    skew = narrow.clone()
    skew.tensors["enc.q"]["lora_B.weight"] = torch.zeros(24, 3)
    assert any("disagree on the rank" in p for p in problems(skew, wide, mixed_ranks=True))


@pytest.mark.parametrize("count", [-1.0, math.inf, math.nan])
def test_bad_example_counts_are_problems(count):
    s = synthetic_clients([4])[0]
    assert any("num-examples" in p for p in problems(s, s, num_examples=count))


def test_dirichlet_split_is_a_partition_and_deterministic():
    labels = np.random.default_rng(0).integers(0, 3, 600).tolist()
    shards = dirichlet_split(labels, 10, 0.5, seed=1)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(600))
    assert shards == dirichlet_split(labels, 10, 0.5, seed=1)
    assert shards != dirichlet_split(labels, 10, 0.5, seed=2)


def test_smaller_alpha_gives_more_label_skew():
    labels = np.random.default_rng(0).integers(0, 3, 3000).tolist()

    def skew(alpha):
        hist = label_histogram(labels, dirichlet_split(labels, 10, alpha, seed=3), 3)
        return float((hist.max(1) / hist.sum(1)).mean())  # mean share of each client's main class

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.45  # close to uniform (1/3)


def test_impossible_splits_say_what_to_change():
    with pytest.raises(ValueError, match="raise alpha or lower min_size"):
        dirichlet_split([0] * 20 + [1] * 20, 10, 0.01, min_size=4, attempts=3)
