"""Secure aggregation with Flower's SecAgg+: the server gets the weighted mean (within the quantisation error),
never a client's adapter; bad replies and dropouts; the strategies it cannot serve are refused."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from fedutil import run, toy
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_fed_faults import BAD

from lorakit.federated import relative_error, secagg, update_of
from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Experiment, Settings
from lorakit.federated.records import to_arrays


def _arrays(strategy):
    return {k: a.numpy().astype(np.float64) for k, a in to_arrays(strategy.state.adapter).items()}


def _bound(settings, partitions):
    exp = Experiment(settings)
    counts = [len(exp.shards[p]) for p in partitions]
    return secagg.error_bound(counts, max(len(s) for s in exp.shards), settings.secagg_clip_range)


def _leaving(store):
    def mod(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        store.append(reply)
        return reply
    return mod


@pytest.mark.parametrize("name,ranks", [("fedit", ""), ("ffa_lora", ""), ("ffa_lora", "2,4"), ("zero_pad", "2,4")])
def test_the_secure_mean_equals_the_plain_aggregate_within_the_quantisation_error(name, ranks):
    left = []
    secure, _, _ = run(toy(strategy=name, num_rounds=1, secagg=True, client_ranks=ranks), outer=[_leaving(left)])
    plain, _, _ = run(toy(strategy=name, num_rounds=1, client_ranks=ranks))
    got, want = _arrays(secure), _arrays(plain)
    assert secure.state.adapter.config.to_dict() == plain.state.adapter.config.to_dict()
    bound = _bound(toy(strategy=name, secagg=True), range(4))
    assert 1e-7 < bound < 1e-5  # K (2 R / Q) / sum w: 8 / 2^21 per client, over weights near 1
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    step = max(float(np.abs(want[k] - a.numpy()).max()) for k, a in to_arrays(secure.reference).items())
    assert 0 < diff <= bound + 1e-7 < 1e-3 * step  # quantised (not exact), within the bound, far below the update
    assert secure.state.log[1]["secagg-error-bound"] == pytest.approx(bound)
    # nothing of an adapter leaves a node in the clear: the collect stage sends only masked integers
    collected = [r for r in left if "adapter" in r.content]
    assert len(collected) == 4 and all(len(rec) == 0 for r in collected for rec in r.content.array_records.values())
    masked = [r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for r in collected]
    sent = to_arrays(secure.state.adapter, skip=secure.rule.shared)
    assert all(len(m) == 1 + len(sent) for m in masked)  # the weight factor, then one vector per tensor sent
    assert {bytes_to_ndarray(m[1]).shape for m in masked} == {sent[next(iter(sent))].numpy().shape}  # one shape
    assert secure.state.log[1]["uplink-bytes"] > plain.state.log[1]["uplink-bytes"]  # the protocol's overhead


@pytest.mark.parametrize("kind", ["base", "method", "examples"])
def test_a_reply_the_server_refuses_is_unmasked_as_a_dropout_and_the_round_goes_on(kind, caplog):
    def corrupt(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        if int(ctxt.node_config["partition-id"]) == 1 and "adapter" in reply.content:
            reply = BAD[kind](reply)
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        secure, _, _ = run(toy(num_rounds=1, secagg=True), outer=[corrupt])
    record = secure.state.log[1]
    assert (record["accepted"], record["rejected"], record["skipped"]) == (3, 1, 0)
    assert "rejected the update of node 2" in caplog.text
    # the mean is the plain aggregate of the three others: the refused node's masks were removed
    plain, _, _ = run(toy(num_rounds=1), fault=lambda m, c, r: BAD["nan"](r) if int(c.node_config["partition-id"]) == 1 else r)
    got, want = _arrays(secure), _arrays(plain)
    bound = _bound(toy(secagg=True), [0, 2, 3])
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= bound + 1e-7


@pytest.mark.parametrize("kind", ["rank", "shape"])
def test_a_masked_vector_of_another_shape_is_rejected_before_the_sum(kind, caplog):
    def reshape(msg, context, reply):  # the node trained (and masks) tensors of another rank or shape
        return BAD[kind](reply) if int(context.node_config["partition-id"]) == 2 else reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        secure, _, _ = run(toy(num_rounds=1, secagg=True), fault=reshape)
    record = secure.state.log[1]
    assert (record["accepted"], record["rejected"], record["skipped"]) == (3, 1, 0)
    assert "masked vector shapes" in record["rejections"][0]["reasons"][0]
    plain, _, _ = run(toy(num_rounds=1), fault=reshape)
    got, want = _arrays(secure), _arrays(plain)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= _bound(toy(secagg=True), [0, 1, 3]) + 1e-7


def test_a_client_with_nan_refuses_to_send_and_secagg_goes_on_without_it(caplog):
    def nan(msg, context, reply):
        return BAD["nan"](reply) if int(context.node_config["partition-id"]) == 3 else reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        secure, _, _ = run(toy(num_rounds=1, secagg=True), fault=nan)
    record = secure.state.log[1]
    assert (record["accepted"], record["failed"], record["skipped"]) == (3, 1, 0)
    assert "NaN/inf values; the update is not sent" in caplog.text
    assert all(np.isfinite(v).all() for v in _arrays(secure).values())


def test_values_beyond_the_quantisation_range_are_refused_not_clipped(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        secure, _, _ = run(toy(num_rounds=1, secagg=True, secagg_clip_range=1e-3))
    assert secure.state.log[1]["skipped"] == 1 and secure.state.log[1]["failed"] == 4
    assert "beyond the quantisation range" in caplog.text


@pytest.mark.parametrize("changes,match", [
    (dict(strategy="flora"), "stacks each client's own factors"),
    (dict(dp="server-fixed"), "clips each update on the server"),
    (dict(dp="server-adaptive"), "clips each update on the server"),
    (dict(dp="client-adaptive"), "clipped bit, which its mod sends in clear"),
    (dict(secagg_clip_range=0.0), "secagg-clip-range"),
    (dict(num_clients=1, min_replies=1), "at least 2 sampled nodes"),
])
def test_invalid_secagg_settings_are_refused_before_the_run(changes, match):
    with pytest.raises(ValueError, match=match):
        Settings(secagg=True, **changes)


def test_cli_secagg_flag_and_its_refusal(tmp_path, capsys):
    args = ["run", "--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "1", "--local-steps",
            "2", "--max-train", "120", "--max-eval", "60", "--rank", "4", "--secagg"]
    assert cli_main([*args, "-o", str(tmp_path / "a")]) == 0
    assert '"secagg": true' in (tmp_path / "a" / "history.json").read_text()
    assert cli_main([*args, "--strategy", "flora", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "secagg cannot be combined with strategy 'flora'" in err


def test_secure_fedavg_dense_merges_the_plain_update_up_to_the_quantisation_error():
    settings = toy(strategy="fedavg_dense", num_rounds=2, client_ranks="2,4")
    secure, _, _ = run(Settings(**{**settings.__dict__, "secagg": True}))
    plain, _, _ = run(Settings(**{**settings.__dict__, "num_rounds": 1}))
    bound = _bound(Settings(**{**settings.__dict__, "secagg": True}), range(4))
    got, want = secure.state.history[1], plain.state.history[1]
    for path in want.tensors:  # factors of the dense mean, truncated to rank 2+4+2+4: within 2x the noise
        delta = update_of(got, path) - update_of(want, path)
        assert got.low_rank(path)[0].shape[0] <= 12
        assert 0 < float(delta.norm()) <= 2 * bound * delta.numel() ** 0.5
    assert [r["accepted"] for r in secure.state.log[1:]] == [4, 4]  # round 2: the nodes caught up on round 1
    assert secure.state.synced == {str(n): 1 for n in range(1, 5)}  # so round 3 would send each node round 2 only


def test_secure_lora_fair_corrects_from_the_three_sums():
    secure, _, _ = run(toy(strategy="lora_fair", num_rounds=1, secagg=True))
    plain, _, _ = run(toy(strategy="lora_fair", num_rounds=1))
    bound = _bound(toy(secagg=True), range(4))
    for path, tensors in plain.state.adapter.tensors.items():
        got = secure.state.adapter.tensors[path]
        assert float((got["lora_A.weight"] - tensors["lora_A.weight"]).abs().max()) <= bound + 1e-7  # A_bar
        err = relative_error(update_of(secure.state.adapter, path), update_of(plain.state.adapter, path))
        assert err < 1e-4  # B_bar + ΔB: the correction from sums within the quantisation error
