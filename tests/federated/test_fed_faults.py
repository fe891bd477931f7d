"""Faults and bad input: dropouts, too few replies, corrupted updates, a server restart, a node that lost its
state. Run in one process through the same ServerApp strategy and ClientApp."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from fedutil import aggregate_of as _aggregate_of, around_rounds, client_app, run as _run, toy
from flwr.app import Array

from lorakit.federated import update_of
from lorakit.federated.experiment import Experiment
from lorakit.federated.local import InProcessGrid
from lorakit.federated.records import from_arrays
from lorakit.federated.server_app import LoRAStrategy


def _same_updates(a, b):
    return all(torch.allclose(update_of(a, p), update_of(b, p), atol=1e-6) for p in b.tensors)


def test_a_client_that_fails_mid_round_is_left_out():
    def fail(msg, context, reply):
        if int(msg.content["config"]["server-round"]) == 2 and int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("node lost power")
        return reply

    strategy, sent, _ = _run(toy(num_rounds=3), fail)
    log = strategy.state.log
    assert (log[2]["accepted"], log[2]["failed"]) == (3, 1) and log[3]["accepted"] == 4
    assert sum(1 for r, p, _ in sent if r == 2) == 3


def test_the_round_2_global_is_the_aggregate_of_the_survivors():
    def fail(msg, context, reply):
        if int(msg.content["config"]["server-round"]) == 2 and int(context.node_config["partition-id"]) == 0:
            raise RuntimeError("gone")
        return reply

    strategy, sent, _ = _run(toy(num_rounds=2), fail)
    assert _same_updates(strategy.state.adapter, _aggregate_of(strategy, sent, 2, {1, 2, 3}))


def test_a_node_that_stops_answering_is_left_out():
    settings = toy(num_rounds=2)
    grid = InProcessGrid(client_app(), 4, settings.to_config())
    strategy = LoRAStrategy(Experiment(settings))
    # the node vanishes after it was sampled
    around_rounds(strategy, after=lambda rnd: setattr(grid, "offline", {2} if rnd == 2 else set()))
    strategy.start(grid)
    assert (strategy.state.log[2]["accepted"], strategy.state.log[2]["failed"]) == (3, 0)


@pytest.mark.parametrize("name", ["fedit", "flora"])
def test_a_straggler_past_the_reply_timeout_is_left_out_and_rejoins_next_round(name):
    settings = toy(strategy=name, num_rounds=3, reply_timeout=30.0)
    sent, entering = [], {}
    grid = InProcessGrid(client_app(sent=sent), 4, settings.to_config())
    strategy = LoRAStrategy(Experiment(settings))

    def before(rnd):
        entering[rnd] = strategy.state.history.get(rnd - 1) if strategy.rule.restart else strategy.state.adapter
        grid.latency = {3: 45.0} if rnd == 2 else {}  # node 3 (partition 2) answers round 2 after the timeout

    around_rounds(strategy, before=before)
    strategy.start(grid)
    log = strategy.state.log
    assert [(r["accepted"], r["failed"]) for r in log[1:]] == [(4, 0), (3, 0), (4, 0)]
    assert len(grid.late) == 1 and grid.late[0].metadata.src_node_id == 3  # it trained, but too late
    assert _same_updates(entering[3], _aggregate_of(strategy, sent, 2, {0, 1, 3}))  # round 2: the three in time
    assert _same_updates(strategy.state.history[3] if strategy.rule.restart else strategy.state.adapter,
                         _aggregate_of(strategy, sent, 3, {0, 1, 2, 3}))  # round 3: all four again
    if strategy.rule.restart:  # FLoRA: the straggler folded round 2's merged update before training round 3
        assert int(grid.contexts[3].state["sync"]["base-round"]) == 2


def test_a_round_with_too_few_replies_keeps_the_global_adapter(caplog):
    def fail(msg, context, reply):
        if int(msg.content["config"]["server-round"]) == 2 and int(context.node_config["partition-id"]) < 2:
            raise RuntimeError("down")
        return reply

    seen = {}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _, _ = _run(toy(num_rounds=3, min_replies=3), fail, seen=seen)
    assert strategy.state.log[2]["skipped"] == 1 and strategy.state.log[3]["skipped"] == 0
    assert "fewer than min-replies=3" in caplog.text
    cfg = strategy.state.adapter.config
    g2, g3 = (from_arrays(seen[(r, 3)].content["global"], cfg) for r in (2, 3))
    assert all(torch.equal(g2.tensors[p][k], g3.tensors[p][k]) for p in g2.tensors for k in g2.tensors[p])


def _replace(reply, key, fn):
    arrays = reply.content["arrays"]
    arrays[key] = Array(fn(arrays[key].numpy().copy()))
    return reply


def _nan(a):
    a.flat[0] = np.nan
    return a


def _inf(a):
    a.flat[-1] = np.inf
    return a


def _add(reply, key, value):
    reply.content["arrays"][key] = Array(value)
    return reply


def _examples(reply, n):
    reply.content["metrics"]["num-examples"] = n
    return reply


def _declare(reply, **changes):
    info = reply.content["adapter"]
    config = json.loads(str(info["adapter-config"]))
    for key, value in changes.items():
        if key == "base-id":
            info["base-id"] = value
        else:
            config[key] = value
    info["adapter-config"] = json.dumps(config)
    return reply


BAD = {
    "nan": lambda r: _replace(r, "t/query/lora_B.weight", _nan),
    "inf": lambda r: _replace(r, "t/value/lora_A.weight", _inf),
    "shape": lambda r: _replace(r, "t/value/lora_A.weight", lambda a: a[:, :-1].copy()),
    "rank": lambda r: _replace(r, "t/query/lora_B.weight", lambda a: a[:, :2].copy()),
    "head": lambda r: _replace(r, "m/classifier/weight", lambda a: np.ones((5, 32), np.float32)),
    "dtype": lambda r: _replace(r, "t/value/lora_B.weight", lambda a: a.astype(np.float64)),
    "target": lambda r: _add(r, "t/embed/lora_A.weight", np.ones((4, 64), np.float32)),  # a module not agreed on
    "key": lambda r: _add(r, "weights.bin", np.ones(3, np.float32)),
    "examples": lambda r: _examples(r, -3),
    "method": lambda r: _declare(r, use_dora=True),  # a DoRA adapter of the same shapes
    "peft-type": lambda r: _declare(r, peft_type="LOHA"),
    "base": lambda r: _declare(r, **{"base-id": "0123456789abcdef"}),  # trained on another base model
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_update_is_rejected_logged_and_the_round_goes_on(kind, caplog):
    def corrupt(msg, context, reply):
        if int(msg.content["config"]["server-round"]) == 1 and int(context.node_config["partition-id"]) == 2:
            return BAD[kind](reply)
        return reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, sent, _ = _run(toy(num_rounds=1), corrupt)
    record = strategy.state.log[1]
    assert (record["accepted"], record["rejected"]) == (3, 1)
    assert "rejected the update of node" in caplog.text and record["rejections"][0]["reasons"]
    assert record["rejections"][0]["node"] == "3"  # partition 2 is node 3
    named = {"method": "use_dora", "peft-type": "peft_type", "base": "another base model"}
    assert named.get(kind, "") in " ".join(record["rejections"][0]["reasons"])
    assert _same_updates(strategy.state.adapter, _aggregate_of(strategy, sent, 1, {0, 1, 3}))
    assert all(torch.isfinite(t).all() for d in strategy.state.adapter.tensors.values() for t in d.values())


@pytest.mark.parametrize("name,extra", [("fedit", {}), ("flora", {}), ("fedit", {"server_opt": "yogi"}),
                                        ("ffa_lora", {"dp": "server-fixed", "dp_clip": 0.05})])
def test_the_server_resumes_from_its_checkpoint(name, extra, tmp_path):
    straight, _, _ = _run(toy(strategy=name, num_rounds=4, **extra))
    settings = toy(strategy=name, num_rounds=2, checkpoint_dir=str(tmp_path / "ckpt"), **extra)
    first, _, grid = _run(settings)
    resumed, _, _ = _run(toy(strategy=name, num_rounds=4, checkpoint_dir=str(tmp_path / "ckpt"), **extra), grid=grid)
    assert [r["round"] for r in resumed.state.log] == [0, 1, 2, 3, 4]
    assert resumed.state.log[:3] == first.state.log
    for a, b in zip(resumed.state.log[1:], straight.state.log[1:]):  # the same run as one that never stopped
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for path in straight.state.adapter.tensors:
        assert torch.allclose(update_of(resumed.state.adapter, path), update_of(straight.state.adapter, path), atol=1e-6)


def test_a_flora_node_that_lost_its_state_catches_up_next_round():
    settings = toy(strategy="flora", num_rounds=4)
    grid = InProcessGrid(client_app(), 4, settings.to_config())
    strategy = LoRAStrategy(Experiment(settings))

    def forget(rnd):
        if rnd == 3:  # node 2 restarts and forgets what it merged
            for key in list(grid.contexts[2].state.keys()):
                del grid.contexts[2].state[key]

    around_rounds(strategy, before=forget)
    strategy.start(grid)
    failed = [r["failed"] for r in strategy.state.log[1:]]
    assert failed == [0, 0, 1, 0]  # refused in round 3 (out of sync), back in round 4 with every update resent
    assert int(grid.contexts[2].state["sync"]["base-round"]) == 3
