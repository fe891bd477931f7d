"""Properties every registered merger must have (parametrised over ``MERGERS``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from merge_helpers import TOYS, assert_close, factors_update, mixed, toy_state, update, weighted_sum

import lorakit
from lorakit.merging import MERGERS, MergeError, combine
from lorakit.merging.combine import _layout, _part
from lorakit.testing import ToyConv1D, ToyLinear

NAMES = MERGERS.names()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "rank_pattern"])
def test_lone_adapter_with_weight_one_is_returned_unchanged(name, kind):
    config = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"dora": True},
              "rank_pattern": {"rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin1": 3}}}[kind]
    state = toy_state(5, **config)
    out = combine([state], name)
    assert out.config == state.config
    assert out.tensors.keys() == state.tensors.keys()
    for path, tensors in state.tensors.items():
        assert all(torch.equal(out.tensors[path][k], v) for k, v in tensors.items()), path
        assert out.tensors[path]["lora_A.weight"] is not tensors["lora_A.weight"]  # a copy


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("toy", TOYS, ids=lambda t: t.__name__)
def test_method_reproduces_a_lone_adapter_under_its_exact_knobs(name, toy):
    """The merge function itself (no shortcut): one input, weight 1, lossless knobs -> the same update."""
    m = MERGERS.get(name)
    state = toy_state(6, toy=toy, use_rslora=True)
    for path in state.modules():
        parts = [_part(state, path, _layout(path, [state]))]
        extra = {"generator": torch.Generator().manual_seed(0)} if m.random else {}
        a, b = m.fn(parts, [1.0], **m.exact, **extra)
        assert_close(factors_update(state, path, a, b, toy), update(state, path, toy), f"{name} {path}")


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs(name):
    m = MERGERS.get(name)
    state = toy_state(7)
    out = combine([state] * 3, name, **m.exact)
    factor = 1.0 if m.averages else 3.0
    for path in state.modules():
        assert_close(out.delta(path), factor * update(state, path), f"{name} {path}")


@pytest.mark.parametrize("name", [n for n in NAMES if MERGERS.get(n).order_invariant])
def test_order_of_inputs_does_not_matter(name):
    states, weights = mixed(), [0.5, 1.5, -0.7]
    ab = combine(states, name, weights)
    ba = combine(states[::-1], name, weights[::-1])
    for path in ab.modules():
        assert_close(ab.delta(path), ba.delta(path), f"{name} {path}", atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if MERGERS.get(n).random])
def test_random_methods_are_reproducible_from_the_seed(name):
    states = mixed()
    first, again = combine(states, name, seed=3), combine(states, name, seed=3)
    for path in first.modules():
        assert torch.equal(first.delta(path), again.delta(path))


@pytest.mark.parametrize("name", NAMES)
def test_result_is_an_ordinary_adapter(name, tmp_path):
    """Different ranks and overlapping targets; the result saves, reloads and runs on the base model."""
    states = mixed()
    out = combine(states, name, [0.5, 0.3, 0.2])
    assert sorted(out.modules()) == ["lin0", "lin1"]
    assert out.config.use_rslora is False and out.config.lora_alpha == out.config.r
    for path in out.modules():  # scaling 1 on every module, rank_pattern included
        assert out.module_config(path).scaling == 1.0
        assert out.module_config(path).r == out.tensors[path]["lora_A.weight"].shape[0]
    lorakit.save_state(out, tmp_path / "m")
    back = lorakit.load_state(tmp_path / "m")
    torch.manual_seed(0)
    model = back.load_into(ToyLinear())
    x = model.example()
    torch.manual_seed(0)
    plain = ToyLinear()
    with torch.no_grad():
        for path in out.modules():
            plain.get_submodule(path).weight += out.delta(path)
        assert_close(model(x), plain(x), f"{name}: loaded adapter vs base + merged update")


@pytest.mark.parametrize("name", NAMES)
def test_inputs_for_different_shapes_are_refused(name):
    other = toy_state(1, toy=ToyConv1D, targets=["c1"])  # GPT-2 style weights: fan_in_fan_out
    small = toy_state(2)
    wrong = dataclasses.replace(small, tensors={"lin1": {k: v[..., :5] if k == "lora_A.weight" else v for k, v in small.tensors["lin1"].items()}})
    with pytest.raises(MergeError, match="'lin1' has different shapes"):
        combine([small, wrong], name)
    with pytest.raises(MergeError, match="fan_in_fan_out"):
        combine([small, other], name)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_for_different_base_models_are_refused(name):
    a = toy_state(1).replace(base_model_name_or_path="org/model-a")
    b = toy_state(2).replace(base_model_name_or_path="org/model-b")
    with pytest.raises(MergeError, match="different base models: org/model-a, org/model-b"):
        combine([a, b], name)


@pytest.mark.parametrize("name", NAMES)
def test_dora_is_refused_except_alone_with_weight_one(name):
    dora, lora = toy_state(1, dora=True), toy_state(2)
    with pytest.raises(MergeError, match="adapter 0 is DoRA.*not low-rank"):
        combine([dora, lora], name)
    with pytest.raises(MergeError, match="DoRA"):
        combine([dora], name, [0.5])


def test_user_errors_name_the_problem():
    states = mixed()
    with pytest.raises(KeyError, match="unknown merge method 'tie'. Did you mean 'ties'"):
        combine(states, "tie")
    with pytest.raises(MergeError, match="expected 3 finite weights"):
        combine(states, "linear", [1.0, 2.0])
    with pytest.raises(MergeError, match="no setting densty; its settings: density, majority, rank"):
        combine(states, "ties", densty=0.3)
    with pytest.raises(MergeError, match="rank must be a positive integer, found 0"):
        combine(states, "svd", rank=0)
    with pytest.raises(MergeError, match="deterministic"):
        combine(states, "svd", seed=1)
    with pytest.raises(MergeError, match="sum to zero"):
        combine(states[:2], "linear", [1.0, -1.0])


def test_absent_modules_count_as_zero_updates():
    states, weights = mixed(), [0.5, 0.3, 0.2]
    out = combine(states, "task_arithmetic", weights)
    assert_close(out.delta("lin0"), weighted_sum(states, weights, "lin0"))  # input 1 does not adapt lin0


def test_modules_to_save_policies():
    a = toy_state(1, modules_to_save=["head"])
    b = toy_state(2, modules_to_save=["head"])
    with torch.no_grad():
        b.modules_to_save["head"]["weight"] += 1.0
    with pytest.raises(MergeError, match="modules_to_save 'head' differs"):
        combine([a, b], "linear")
    mean = combine([a, b], "linear", [3.0, 1.0], modules_to_save="mean")
    assert_close(mean.modules_to_save["head"]["weight"], a.modules_to_save["head"]["weight"] + 0.25)
    assert mean.config.modules_to_save == ["head"]
    assert combine([a, b], "linear", modules_to_save="drop").modules_to_save == {}
    assert torch.equal(combine([a, b], "linear", modules_to_save=1).modules_to_save["head"]["weight"],
                       b.modules_to_save["head"]["weight"])
    same = combine([a, a], "linear")
    assert torch.equal(same.modules_to_save["head"]["weight"], a.modules_to_save["head"]["weight"])


def test_merging_leaves_the_inputs_alone():
    states = mixed()
    before = [{p: {k: v.clone() for k, v in s.tensors[p].items()} for p in s.tensors} for s in states]
    for name in NAMES:
        combine(states, name, [0.5, 0.3, 0.2])
    for s, saved in zip(states, before):
        assert all(torch.equal(s.tensors[p][k], v) for p in saved for k, v in saved[p].items())
