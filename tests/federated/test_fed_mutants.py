"""Aggregation maths pinned where mutation testing found it loose."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit import AdapterState, DoRAConfig, LoRAConfig
from lorakit.federated import aggregate, aggregation_error, exact_update, normalised, relative_error, update_of
from lorakit.federated.aggregation import with_factors, with_ranks
from lorakit.federated.strategies.lora_fair import fair_objective
from lorakit.federated.conformance import synthetic_clients
from lorakit.federated.strategies.fedavg_dense import exact_factors


def test_exact_factors_have_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3):
        delta = torch.randn(7, r, generator=g, dtype=torch.float64) @ torch.randn(r, 5, generator=g, dtype=torch.float64)
        a, b = exact_factors(delta)
        assert a.shape == (r, 5) and b.shape == (7, r)
        torch.testing.assert_close(b @ a, delta)
    a, b = exact_factors(torch.zeros(4, 3, dtype=torch.float64))  # a zero update keeps one (zero) unit
    assert a.shape[0] == 1 and (b @ a == 0).all()


def test_config_mismatch_message_names_at_most_four_fields():
    a, b = synthetic_clients([4, 4], seed=1)
    cfg = dataclasses.replace(b.config, lora_alpha=3, lora_dropout=0.1, use_rslora=True, bias="all", fan_in_fan_out=True)
    other = type(b)(cfg, b.tensors)
    with pytest.raises(ValueError, match=r"strategy 'fedit' needs one adapter config for all clients; client 1 differs "
                       r"from client 0 in bias='all' \(client 0: 'none'\), fan_in_fan_out=True \(client 0: False\), "
                       r"lora_alpha=3 \(client 0: 8\), lora_dropout=0.1 \(client 0: 0.0\)$") as err:
        aggregate("fedit", [a, other], [1, 1])
    assert "use_rslora" not in str(err.value)  # the fifth difference is left out of the one-line message


def test_ffa_lora_takes_the_shared_init_from_the_widest_client_wherever_it_is():
    states = synthetic_clients([16, 4, 8, 2], seed=2, shared_a=True)
    out = aggregate("ffa_lora", states, [1, 2, 3, 4])
    weights = normalised([1, 2, 3, 4], 4)
    for path in out.tensors:
        assert out.low_rank(path)[0].shape[0] == 16
        assert relative_error(update_of(out, path), exact_update(states, weights, path)) < 1e-6


def test_relative_error_golden():
    x = torch.tensor([[0.003, -0.004]])  # ||x|| = 0.005: below 1, so no clamp may bind
    assert relative_error(2 * x, x) == pytest.approx(1.0)
    assert relative_error(x, x) == 0.0


def test_aggregation_error_is_the_mean_relative_error_over_modules():
    states, counts = synthetic_clients([4, 4, 4], seed=6), [1, 2, 5]
    fedit = aggregate("fedit", states, counts)
    p = normalised(counts, 3)
    want = sum(relative_error(update_of(fedit, m), exact_update(states, p, m)) for m in fedit.tensors) / len(fedit.tensors)
    assert aggregation_error(fedit, states, counts) == pytest.approx(want) and want > 1e-3
    assert aggregation_error(aggregate("flora", states, counts), states, counts) < 1e-6


def test_non_integer_common_scaling_is_kept_by_the_padding_strategies():
    states = synthetic_clients([2, 4, 8], seed=7, shared_a=True)
    states = [AdapterState(dataclasses.replace(s.config, lora_alpha=0.75 * s.config.r), s.tensors) for s in states]
    out = aggregate("ffa_lora", states, [1, 1, 2])
    p = normalised([1, 1, 2], 3)
    for m in out.tensors:
        assert out.config.for_module(m).scaling == pytest.approx(0.75)
        assert relative_error(update_of(out, m), exact_update(states, p, m)) < 1e-6


def test_with_ranks_keeps_a_config_that_already_fits_and_writes_minimal_patterns():
    cfg = LoRAConfig(r=4, lora_alpha=8, rank_pattern={"enc\\.q": 8}, alpha_pattern={"enc\\.q": 16}, target_modules=["q", "v"])
    assert with_ranks(cfg, {"enc.q": 8, "enc.v": 4}, {"enc.q": 2.0, "enc.v": 2.0}) is cfg
    rs = LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["a", "b", "c"])
    out = with_ranks(rs, {"a": 2, "b": 2, "c": 8}, {"a": 0.5, "b": 0.5, "c": 0.5})
    assert (out.r, out.lora_alpha, out.use_rslora) == (2, 1.0, False)  # the most common rank and alpha
    assert out.rank_pattern == {"c": 8} and out.alpha_pattern == {"c": 4.0}
    assert [out.for_module(p).scaling for p in "abc"] == [0.5, 0.5, 0.5]


def test_lora_fair_objective_golden():
    eye = torch.eye(2, dtype=torch.float64)
    db = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # approx = diag(1, 2), target = 2 I: cos = 6 / (sqrt(5) sqrt(8)); penalty 0.5 * ||db|| = 0.5
    got = fair_objective(2 * eye, eye, eye, 1.0, 0.5, db)
    assert float(got) == pytest.approx(1 - 6 / (5**0.5 * 8**0.5) + 0.5, rel=1e-12)
    for tiny in (1e-12, 1e-9):  # the cosine does not depend on the update's scale, however small
        scaled = fair_objective(2 * tiny * eye, tiny * eye, eye, 1.0, 0.0, tiny * db)
        assert float(scaled) == pytest.approx(1 - 6 / (5**0.5 * 8**0.5), rel=1e-9)


def test_lora_fair_names_itself_and_takes_its_step_size():
    with pytest.raises(ValueError, match="strategy 'lora_fair' needs one adapter config"):
        aggregate("lora_fair", synthetic_clients([4, 2], seed=12), [1, 1])
    states = synthetic_clients([4, 4], seed=8)
    frozen, fedit = aggregate("lora_fair", states, [1, 1], lr=0.0), aggregate("fedit", states, [1, 1])
    assert torch.equal(frozen.tensors["enc.q"]["lora_B.weight"], fedit.tensors["enc.q"]["lora_B.weight"])


def test_fedit_names_itself_in_its_config_error():
    with pytest.raises(ValueError, match="strategy 'fedit' needs one adapter config"):
        aggregate("fedit", synthetic_clients([4, 2], seed=12), [1, 1])


def _with(state, **fields):
    return AdapterState(state.config, fields.get("tensors", state.tensors), fields.get("saved", state.modules_to_save),
                        fields.get("base", state.base_tensors))


def test_base_tensors_and_modules_to_save_are_averaged_with_the_weights():
    states = synthetic_clients([4, 4], seed=3, head=True)
    states = [_with(s, base={"emb.weight": torch.full((2, 3), float(k + 1))}) for k, s in enumerate(states)]
    out = aggregate("flora", states, [1, 3])
    torch.testing.assert_close(out.base_tensors["emb.weight"], torch.full((2, 3), 0.25 * 1 + 0.75 * 2))
    want = 0.25 * states[0].modules_to_save["head"]["bias"].double() + 0.75 * states[1].modules_to_save["head"]["bias"].double()
    torch.testing.assert_close(out.modules_to_save["head"]["bias"], want.float())


def test_non_float_tensors_are_copied_and_later_keys_still_averaged():
    states = synthetic_clients([4, 4], seed=3)
    states = [_with(s, base={"a.steps": torch.tensor([7]), "b.weight": torch.full((2,), float(k))}) for k, s in enumerate(states)]
    out = aggregate("fedit", states, [1, 1])
    assert torch.equal(out.base_tensors["a.steps"], torch.tensor([7]))
    torch.testing.assert_close(out.base_tensors["b.weight"], torch.full((2,), 0.5))


def test_clients_disagreeing_on_a_shape_are_named():
    states = synthetic_clients([4, 4], seed=3)
    states = [_with(s, base={"w": torch.zeros(2 + k, 3)}) for k, s in enumerate(states)]
    with pytest.raises(ValueError, match=r"module '', tensor 'w': clients disagree on the shape: \[\(2, 3\), \(3, 3\)\]"):
        aggregate("fedit", states, [1, 1])


def test_module_mismatch_messages_name_the_client_and_what_differs():
    a, b, c = synthetic_clients([4, 4, 4], seed=13, head=True)
    c = _with(c, saved={})
    with pytest.raises(ValueError, match=r"^client 2 and client 0 differ in their modules_to_save: \['head'\]$"):
        aggregate("fedit", [a, b, c], [1, 1, 1])
    many = {f"m{i}": a.tensors["enc.q"] for i in range(7)}
    with pytest.raises(ValueError, match=r"differ in their adapted modules: \['enc.q', 'enc.v', 'm0', 'm1', 'm2'\]$"):
        aggregate("fedit", [a, _with(b, tensors=many)], [1, 1])
    dora = AdapterState(DoRAConfig(r=4, lora_alpha=8, target_modules=["q", "v"]), b.tensors, b.modules_to_save)
    with pytest.raises(ValueError, match=r"^client 1 uses DoRAConfig, client 0 LoRAConfig$"):
        aggregate("fedit", [a, dora], [1, 1])


def test_no_clients_and_zero_counts_are_refused_with_their_reasons():
    with pytest.raises(ValueError, match=r"^strategy 'fedit': no client states to aggregate$"):
        aggregate("fedit", [], [])
    with pytest.raises(ValueError, match=r"^the example counts sum to 0: at least one client must report examples$"):
        normalised([0, 0], 2)
    assert normalised([0.25, 0.5], 2) == [1 / 3, 2 / 3]  # a total below 1 is fine


def test_strategy_options_reach_the_strategy():
    a, b = synthetic_clients([4, 4], seed=11, spread=1e-4)
    with pytest.raises(ValueError, match="another A"):
        aggregate("ffa_lora", [a, b], [1, 1])
    aggregate("ffa_lora", [a, b], [1, 1], atol=1e-2)  # the tolerance is passed through


def test_conv_kernel_dims_are_restored_on_b():
    like = {"lora_A.weight": torch.zeros(2, 3, 1, 1), "lora_B.weight": torch.zeros(5, 2, 1, 1)}
    out = with_factors(like, torch.ones(4, 3, dtype=torch.float64), torch.ones(5, 4, dtype=torch.float64))
    assert out["lora_A.weight"].shape == (4, 3, 1, 1) and out["lora_B.weight"].shape == (5, 4, 1, 1)
    assert out["lora_B.weight"].dtype == torch.float32


def test_methods_without_factors_get_the_whole_advice():
    one = synthetic_clients([4], seed=14)[0]
    dora = AdapterState(DoRAConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
                        {p: {**d, "lora_magnitude_vector": torch.ones(d["lora_B.weight"].shape[0])} for p, d in one.tensors.items()})
    with pytest.raises(ValueError, match=r"method 'dora' does not declare 'aggregatable' .*; use strategy 'fedit' "
                                         r"\(key-wise average of the adapter tensors\) instead$"):
        aggregate("flora", [dora, dora], [1, 1])


def test_aggregation_error_of_a_single_module_is_its_relative_error():
    states = [_with(s, tensors={"enc.q": s.tensors["enc.q"]}) for s in synthetic_clients([4, 4], seed=6)]
    fedit = aggregate("fedit", states, [1, 1])
    want = relative_error(update_of(fedit, "enc.q"), exact_update(states, [0.5, 0.5], "enc.q"))
    assert aggregation_error(fedit, states, [1, 1]) == pytest.approx(want) and want > 1e-3
