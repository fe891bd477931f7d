"""Scale: 120 simulated clients, 10% sampled per round, a sampled node that drops out, one that fails, and a
server restart mid-run that resumes from its checkpoint as if it had never stopped."""
from __future__ import annotations

import pytest
import torch
from fedutil import client_app, toy

from lorakit.federated import update_of
from lorakit.federated.experiment import Experiment
from lorakit.federated.local import InProcessGrid
from lorakit.federated.server_app import LoRAStrategy

N = 120


def _settings(**changes):
    return toy(**{**dict(num_clients=N, fraction_train=0.1, num_rounds=4, local_steps=1, batch_size=8, max_train=1200,
                         dirichlet_alpha=5.0, eval_every=2, max_eval=60), **changes})


def _run(settings, grid=None):
    """Round 2: the highest sampled node leaves after sampling; round 3: the lowest sampled node fails."""
    sampled = {}

    def fault(msg, context, reply):
        rnd = int(msg.content["config"]["server-round"])
        if rnd == 3 and context.node_id == min(sampled[3]):
            raise RuntimeError("out of memory")
        return reply

    grid = grid or InProcessGrid(client_app(fault), N, settings.to_config())
    strategy = LoRAStrategy(Experiment(settings))
    original = strategy.configure_train

    def configure(rnd, arrays, config, g):
        grid.offline = set()
        messages = original(rnd, arrays, config, g)
        sampled[rnd] = sorted(m.metadata.dst_node_id for m in messages)
        if rnd == 2:
            grid.offline = {max(sampled[2])}
        return messages

    strategy.configure_train = configure
    strategy.start(grid)
    return strategy, sampled


def test_hundreds_of_clients_sampled_per_round_with_dropouts_and_a_restart(tmp_path):
    straight, sampled = _run(_settings())
    log = straight.state.log
    assert all(len(sampled[r]) == 12 for r in range(1, 5)) and len(set(sampled[1]) | set(sampled[2])) > 12
    assert [(r["accepted"], r["failed"]) for r in log[1:]] == [(12, 0), (11, 0), (11, 1), (12, 0)]
    assert log[4]["accuracy"] >= 0.0 and all(r["skipped"] == 0 for r in log[1:])

    ckpt = str(tmp_path / "ckpt")
    first, _ = _run(_settings(num_rounds=2, checkpoint_dir=ckpt))
    resumed, resampled = _run(_settings(checkpoint_dir=ckpt))  # a new server process: nothing in memory
    assert [r["round"] for r in resumed.state.log] == [0, 1, 2, 3, 4] and resumed.state.log[:3] == first.state.log
    assert {r: resampled[r] for r in (3, 4)} == {r: sampled[r] for r in (3, 4)}  # the same nodes sampled
    for a, b in zip(resumed.state.log[3:], log[3:]):
        assert (a["accepted"], a["failed"]) == (b["accepted"], b["failed"])
        assert a.get("accuracy") == pytest.approx(b.get("accuracy"))
    for path in straight.state.adapter.tensors:
        assert torch.allclose(update_of(resumed.state.adapter, path), update_of(straight.state.adapter, path), atol=1e-6)
