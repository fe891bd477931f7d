"""Central DP: Flower's server-side wrappers around lorakit's strategy (clipping, noise), epsilon, refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedutil import run, toy
from flwr.app import Array

from lorakit.federated import dp
from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Settings
from lorakit.federated.records import to_arrays


def test_epsilon_of_one_gaussian_release_equals_the_hand_value_and_the_rdp_minimum():
    rho = 0.5  # z = 1: eps_alpha = alpha / 2
    assert dp.epsilon([1.0], 1e-5) == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)), rel=1e-12)
    alphas = np.linspace(1.0001, 200, 400_000)  # the RDP-to-DP conversion minimised by brute force
    for zs in ([1.0], [2.0, 0.5, 3.0], [1.1] * 50):
        brute = float(np.min(alphas * sum(1 / (2 * z * z) for z in zs) + math.log(1e5) / (alphas - 1)))
        assert dp.epsilon(zs, 1e-5) == pytest.approx(brute, rel=1e-6)
    assert dp.epsilon([1.0, 0.0], 1e-5) == math.inf and dp.epsilon([], 1e-5) == 0.0


def _keep_originals(store):
    def fault(msg, context, reply):
        rnd, part = int(msg.content["config"]["server-round"]), int(context.node_config["partition-id"])
        store[(rnd, part)] = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
        return reply
    return fault


def _global_arrays(strategy):
    return {k: a.numpy() for k, a in to_arrays(strategy.state.adapter, skip=strategy.rule.shared).items()}


def _clipped_mean(originals, start, clip):
    ups = []
    for arrays in originals:
        u = {k: arrays[k].astype(np.float64) - start[k] for k in start}
        norm = math.sqrt(sum(float((v * v).sum()) for v in u.values()))
        ups.append({k: v * min(1.0, clip / norm) for k, v in u.items()})
    return {k: start[k] + sum(u[k] for u in ups) / len(ups) for k in start}


@pytest.mark.parametrize("name", ["fedit", "ffa_lora"])
def test_fixed_clipping_without_noise_gives_the_mean_of_clipped_updates(name):
    store = {}
    settings = toy(strategy=name, num_rounds=1, dp="server-fixed", dp_noise=0.0, dp_clip=0.05)
    strategy, _, _ = run(settings, _keep_originals(store))
    start = {k: a.numpy().astype(np.float64) for k, a in to_arrays(strategy.reference, skip=strategy.rule.shared).items()}
    want = _clipped_mean([store[(1, p)] for p in range(4)], start, 0.05)
    got = _global_arrays(strategy)
    assert sorted(got) == sorted(want)
    assert all(np.allclose(got[k], want[k], atol=1e-6) for k in want)
    step = math.sqrt(sum(float(((got[k] - start[k]) ** 2).sum()) for k in want))
    assert step <= 0.05 + 1e-6  # the mean of clipped updates moves at most C
    if name == "ffa_lora":  # the frozen shared A is neither clipped nor noised
        ref = strategy.reference.tensors
        assert all(torch.equal(t["lora_A.weight"], ref[p]["lora_A.weight"]) for p, t in strategy.state.adapter.tensors.items())
    assert strategy.state.log[1]["epsilon"] == math.inf


def test_noise_has_the_documented_std_and_epsilon_is_in_the_summary():
    np.random.seed(0)
    store, z, clip = {}, 2.0, 0.05
    settings = toy(num_rounds=1, dp="server-fixed", dp_noise=z, dp_clip=clip, dp_delta=1e-5)
    strategy, _, _ = run(settings, _keep_originals(store))
    start = {k: a.numpy().astype(np.float64) for k, a in to_arrays(strategy.reference).items()}
    clean = _clipped_mean([store[(1, p)] for p in range(4)], start, clip)
    got = _global_arrays(strategy)
    resid = np.concatenate([(got[k] - clean[k]).ravel() for k in clean])
    assert resid.size > 500 and resid.std() == pytest.approx(z * clip / 4, rel=0.1)
    record = strategy.state.log[1]
    assert record["dp-noise-multiplier"] == z and record["epsilon"] == pytest.approx(dp.epsilon([z], 1e-5))


def test_a_bad_reply_under_dp_is_rejected_before_clipping_and_the_round_goes_on():
    def corrupt(msg, context, reply):
        if int(context.node_config["partition-id"]) == 1:
            arrays = reply.content["arrays"]
            arrays["t/value/lora_A.weight"] = Array(arrays["t/value/lora_A.weight"].numpy()[:, :-1].copy())
        return reply

    strategy, _, _ = run(toy(num_rounds=2, dp="server-fixed", dp_noise=0.5, dp_clip=0.1), corrupt)
    for record in strategy.state.log[1:]:
        assert (record["accepted"], record["rejected"]) == (3, 1) and record["skipped"] == 0
    # 3 of the 4 sampled nodes made up the mean: the effective noise multiplier is z * 3 / 4
    assert strategy.state.log[2]["epsilon"] == pytest.approx(dp.epsilon([0.375, 0.375], 1e-5))


def test_adaptive_clipping_runs_and_moves_its_clipping_norm():
    np.random.seed(1)
    strategy, _, _ = run(toy(num_rounds=2, num_clients=4, dp="server-adaptive", dp_noise=0.1, dp_clip=1e-4))
    clips = [r["dp-clip"] for r in strategy.state.log[1:]]
    assert clips[0] > 1e-4 and clips[1] > clips[0]  # every update is clipped at 1e-4, so the norm grows


def test_adaptive_norm_moves_towards_the_target_clipped_fraction():
    wrapper = dp.AdaptiveClipping(object(), 0.0, 4, initial_clipping_norm=1.0, target_clipped_quantile=0.5,
                                  clip_norm_lr=0.2)
    wrapper._geometric_update(1.0)  # all clipped: grow by exp(0.2 * 0.5)
    assert wrapper.clipping_norm == pytest.approx(math.exp(0.1))
    wrapper._geometric_update(0.0)  # none clipped: shrink by exp(-0.1)
    assert wrapper.clipping_norm == pytest.approx(1.0)


@pytest.mark.parametrize("changes,match", [
    (dict(dp="local"), "dp 'local' is not one of"),
    (dict(dp="server-fixed", dp_noise=-1.0), "dp-noise"),
    (dict(dp="server-fixed", dp_noise=float("nan")), "dp-noise"),
    (dict(dp="server-fixed", dp_clip=0.0), "dp-clip"),
    (dict(dp="server-fixed", dp_delta=1.0), "dp-delta"),
    (dict(dp="server-adaptive", dp_noise=5.0, num_clients=10), "too large for server-adaptive"),
    (dict(dp="server-fixed", strategy="flora"), "FLoRA's stacked update"),
    (dict(dp="server-fixed", strategy="lora_fair"), "non-linear"),
    (dict(dp="server-fixed", strategy="zero_pad", client_ranks="2,4"), "one rank for all clients"),
])
def test_invalid_dp_settings_are_refused_before_the_run(changes, match):
    with pytest.raises(ValueError, match=match):
        Settings(**changes)


def test_cli_refuses_invalid_dp_in_one_line(tmp_path, capsys):
    assert cli_main(["run", "--engine", "inprocess", "--dp", "server-fixed", "--dp-clip", "-1", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dp-clip" in err
