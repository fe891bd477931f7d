"""Client-side DP: Flower's client-side clipping wrappers on the server, its clipping mods on lorakit's ClientApp."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from fedutil import run, toy
from flwr.app import Array, ArrayRecord
from test_fed_dp import _clipped_mean, _global_arrays, _keep_originals
from test_fed_faults import BAD

from lorakit.federated import dp
from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Settings
from lorakit.federated.records import to_arrays


def _leaving(store):
    """An outer mod that keeps what actually leaves each node (after lorakit's mods)."""
    def mod(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        if not reply.has_error():
            rnd = int(msg.content["config"]["server-round"])
            store[(rnd, int(ctxt.node_config["partition-id"]))] = (
                {k: a.numpy().copy() for k, a in msg.content["global"].items()},
                {k: a.numpy().copy() for k, a in reply.content["arrays"].items()})
        return reply
    return mod


def _start(strategy):
    return {k: a.numpy().astype(np.float64) for k, a in to_arrays(strategy.reference, skip=strategy.rule.shared).items()}


@pytest.mark.parametrize("name", ["fedit", "ffa_lora"])
def test_client_fixed_clipping_without_noise_gives_the_mean_of_updates_clipped_by_hand(name):
    originals, left = {}, {}
    settings = toy(strategy=name, num_rounds=1, dp="client-fixed", dp_noise=0.0, dp_clip=0.05)
    strategy, _, _ = run(settings, _keep_originals(originals), outer=[_leaving(left)])
    start = _start(strategy)
    want = _clipped_mean([originals[(1, p)] for p in range(4)], start, 0.05)
    got = _global_arrays(strategy)
    assert sorted(got) == sorted(want) and all(np.allclose(got[k], want[k], atol=1e-6) for k in want)
    for p in range(4):  # the clipping happened on the node: what left it is within C of the global received
        received, sent = left[(1, p)]
        norm = math.sqrt(sum(float(((sent[k].astype(np.float64) - received[k]) ** 2).sum()) for k in received))
        raw = math.sqrt(sum(float(((originals[(1, p)][k].astype(np.float64) - start[k]) ** 2).sum()) for k in start))
        assert raw > 0.05 and norm == pytest.approx(0.05, rel=1e-4)  # every raw update was longer than C
        assert list(sent) == list(received)
    assert strategy.state.log[1]["epsilon"] == math.inf and strategy.state.log[1]["accepted"] == 4


def test_client_fixed_noise_has_std_z_c_over_m_and_epsilon_is_in_the_summary():
    np.random.seed(0)
    originals, z, clip = {}, 2.0, 0.05
    strategy, _, _ = run(toy(num_rounds=1, dp="client-fixed", dp_noise=z, dp_clip=clip), _keep_originals(originals))
    start = _start(strategy)
    clean = _clipped_mean([originals[(1, p)] for p in range(4)], start, clip)
    got = _global_arrays(strategy)
    resid = np.concatenate([(got[k] - clean[k]).ravel() for k in clean])
    assert resid.size > 500 and resid.std() == pytest.approx(z * clip / 4, rel=0.1)
    record = strategy.state.log[1]
    assert record["dp-noise-multiplier"] == z and record["epsilon"] == pytest.approx(dp.epsilon([z], 1e-5))


def test_a_node_that_skips_the_clipping_is_rejected_and_the_round_goes_on(caplog):
    def unclip(msg, ctxt, call_next):  # a node that sends its update scaled up after lorakit's mods clipped it
        reply = call_next(msg, ctxt)
        if int(ctxt.node_config["partition-id"]) == 2:
            received, arrays = msg.content["global"], reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: Array(received[k].numpy() + 3 * (arrays[k].numpy() - received[k].numpy()))
                                                   for k in arrays})
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, _ = run(toy(num_rounds=2, dp="client-fixed", dp_noise=0.5, dp_clip=0.05), outer=[unclip])
    for record in strategy.state.log[1:]:
        assert (record["accepted"], record["rejected"]) == (3, 1) and record["skipped"] == 0
        assert "exceeds the clipping norm" in record["rejections"][0]["reasons"][0]
    assert "not clipped" in caplog.text
    assert strategy.state.log[2]["epsilon"] == pytest.approx(dp.epsilon([0.375, 0.375], 1e-5))


@pytest.mark.parametrize("kind", ["nan", "base", "method", "shape", "rank"])
def test_bad_updates_under_client_dp_are_rejected_and_logged(kind, caplog):
    def corrupt(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        return BAD[kind](reply) if int(ctxt.node_config["partition-id"]) == 1 else reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, _ = run(toy(num_rounds=1, dp="client-fixed", dp_noise=0.0, dp_clip=0.05), outer=[corrupt])
    record = strategy.state.log[1]
    assert (record["accepted"], record["rejected"]) == (3, 1) and "rejected the update of node 2" in caplog.text
    assert all(np.isfinite(v).all() for v in _global_arrays(strategy).values())


def test_client_adaptive_clipping_sends_norm_bits_and_grows_its_norm_when_all_are_clipped():
    np.random.seed(1)
    strategy, sent, _ = run(toy(num_rounds=2, dp="client-adaptive", dp_noise=0.1, dp_clip=1e-4))
    assert all(int(reply.content["metrics"]["norm_bit"]) == 1 for _, _, reply in sent)  # 1: this update was clipped
    clips = [r["dp-clip"] for r in strategy.state.log[1:]]
    assert clips[0] > 1e-4 and clips[1] > clips[0]
    assert isinstance(strategy.private, dp.ClientAdaptiveClipping)


@pytest.mark.parametrize("changes,match", [
    (dict(dp="client-fixed", dp_clip=-1.0), "dp-clip"),
    (dict(dp="client-fixed", dp_noise=float("inf")), "dp-noise"),
    (dict(dp="client-adaptive", dp_noise=5.0, num_clients=10), "too large for client-adaptive"),
    (dict(dp="client-fixed", strategy="flora"), "FLoRA's stacked update"),
    (dict(dp="client-adaptive", strategy="lora_fair"), "non-linear"),
    (dict(dp="client-fixed", strategy="fedavg_dense"), "exact factorisation"),
    (dict(dp="client-fixed", strategy="zero_pad", client_ranks="2,4"), "one rank for all clients"),
])
def test_invalid_client_dp_settings_are_refused_before_the_run(changes, match):
    with pytest.raises(ValueError, match=match):
        Settings(**changes)


def test_cli_runs_client_dp_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    args = ["run", "--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "1", "--local-steps",
            "2", "--max-train", "120", "--max-eval", "60", "--rank", "4"]
    assert cli_main([*args, "--dp", "client-fixed", "--dp-noise", "1.0", "--dp-clip", "0.1", "-o", str(tmp_path / "a")]) == 0
    assert "epsilon" in (tmp_path / "a" / "history.json").read_text()
    assert cli_main([*args, "--dp", "client-fixed", "--dp-clip", "0", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dp-clip" in err
