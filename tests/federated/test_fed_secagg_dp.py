"""SecAgg+ with client-side DP (Flower's composition): each client clips before masking, the server adds the noise
to the unmasked mean; the result is the plain clipped mean plus that noise, and epsilon is reported."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fedutil import run, toy
from test_fed_dp import _clipped_mean, _global_arrays, _keep_originals

from lorakit.federated import dp, mods
from lorakit.federated.records import to_arrays

QSTEP = 2 * 8.0 / 2**22  # SecAgg+'s quantisation step at the default range: the mean is within it per entry


def _start(strategy):
    return {k: a.numpy().astype(np.float64) for k, a in to_arrays(strategy.reference, skip=strategy.rule.shared).items()}


def _recording_noise(monkeypatch, store):
    original = dp.add_gaussian_noise_inplace

    def add(arrays, std):
        before = [a.copy() for a in arrays]
        original(arrays, std)
        store.append((std, [a.astype(np.float64) - b for a, b in zip(arrays, before)]))
    monkeypatch.setattr(dp, "add_gaussian_noise_inplace", add)


@pytest.mark.parametrize("name", ["fedit", "ffa_lora"])
def test_the_noised_secure_aggregate_is_the_plain_clipped_mean_plus_the_noise(name, monkeypatch):
    z, clip, noise, originals = 2.0, 0.05, [], {}
    _recording_noise(monkeypatch, noise)
    settings = toy(strategy=name, num_rounds=1, dp="client-fixed", dp_noise=z, dp_clip=clip, secagg=True)
    secure, _, _ = run(settings, _keep_originals(originals))
    plain, _, _ = run(toy(strategy=name, num_rounds=1, dp="client-fixed", dp_noise=z, dp_clip=clip))
    std, drawn = noise[0]
    assert len(noise) == 1 and std == pytest.approx(z * clip / 4)  # z C / m, m = 4 sampled nodes
    got, keys = _global_arrays(secure), list(to_arrays(secure.reference, skip=secure.rule.shared).keys())
    clean = _clipped_mean([originals[(1, p)] for p in range(4)], _start(secure), clip)  # the mean of clipped updates
    for key, n in zip(keys, drawn):
        assert np.abs(got[key] - n - clean[key]).max() <= QSTEP + 1e-6  # mean (within quantisation) + the noise
    flat = np.concatenate([n.ravel() for n in drawn])
    assert flat.size > 300 and abs(flat.std() / std - 1) < 0.15  # the noise itself: std z C / m
    record, reference = secure.state.log[1], plain.state.log[1]
    assert record["epsilon"] == pytest.approx(reference["epsilon"]) and math.isfinite(record["epsilon"])
    assert (record["dp-clipping-verified"], reference["dp-clipping-verified"]) == (0, 1)
    assert record["dp-noise-multiplier"] == reference["dp-noise-multiplier"] == z


def test_a_client_clips_its_update_before_masking(monkeypatch):
    clip, seen = 0.05, {}
    original = mods.as_fitres

    def watching(call_next, limit, unit_weight=False):  # sees the reply between the clipping and the masking
        inner = original(call_next, limit, unit_weight)

        def look(msg, ctxt):
            received = {k: a.numpy().astype(np.float64) for k, a in msg.content["global"].items()}
            reply = inner(msg, ctxt)
            sent = reply.content["fitres.parameters"]
            seen[int(ctxt.node_config["partition-id"])] = (
                math.sqrt(sum(float(((sent[k].numpy() - v) ** 2).sum()) for k, v in received.items())),
                int(reply.content["fitres.num_examples"]["num_examples"]))
            return reply
        return look
    monkeypatch.setattr(mods, "as_fitres", watching)

    def oversized(msg, context, reply):  # node 1 sends an update 1000x longer than it trained
        if int(context.node_config["partition-id"]) == 1:
            for key, array in list(reply.content["arrays"].items()):
                start = msg.content["global"][key].numpy()
                reply.content["arrays"][key] = type(array)(start + 1000 * (array.numpy() - start))
        return reply

    secure, _, _ = run(toy(num_rounds=1, dp="client-fixed", dp_noise=0.0, dp_clip=clip, secagg=True), oversized)
    plain, _, _ = run(toy(num_rounds=1, dp="client-fixed", dp_noise=0.0, dp_clip=clip), oversized)
    assert all(norm <= clip * (1 + 1e-5) and weight == 1 for norm, weight in seen.values()) and len(seen) == 4
    got, want = _global_arrays(secure), _global_arrays(plain)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= QSTEP + 1e-6
    assert secure.state.log[1]["accepted"] == 4


def test_cli_runs_secagg_with_client_dp_and_says_who_clipped(tmp_path, capsys):
    from lorakit.federated.cli import cli_main

    args = ["run", "--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "2", "--local-steps",
            "2", "--max-train", "120", "--max-eval", "60", "--rank", "4", "--strategy", "ffa_lora", "--secagg"]
    assert cli_main([*args, "--dp", "client-fixed", "--dp-noise", "1.0", "--dp-clip", "0.5", "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    rounds = json.loads((tmp_path / "a" / "history.json").read_text())["rounds"]
    eps = rounds[-1]["epsilon"]
    assert f"DP (client-fixed, with SecAgg+): epsilon {eps:.4g} at delta 1e-05 after 2 noised round(s)" in out
    assert "the server cannot verify it" in out and all(r["dp-clipping-verified"] == 0 for r in rounds[1:])
    assert cli_main([*args, "--dp", "server-fixed", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clips each update on the server" in err
