"""Personalised adapters across a server restart: the server resumes from its checkpoint, each node trains on
from the personal part it finished before the redone round (kept in its state or on its disk), and the exported
adapters and users.json are those of a run that never stopped."""
from __future__ import annotations

import json

import pytest
import torch
from fedutil import client_app, toy

from lorakit.federated.experiment import Experiment
from lorakit.federated.local import InProcessGrid
from lorakit.federated.server_app import LoRAStrategy
from lorakit.formats.peft import load_state


class Crash(Exception):
    pass


def _crash_after_training(grid, rnd):
    """The server dies once the nodes have trained round ``rnd``, before it checkpoints that round."""
    original = grid.send_and_receive

    def send(messages, timeout=None):
        messages = list(messages)
        replies = original(messages, timeout=timeout)
        if any(int(m.content["config"]["server-round"]) == rnd for m in messages):
            grid.send_and_receive = original
            raise Crash
        return replies
    grid.send_and_receive = send


def _start(settings, grid):
    strategy = LoRAStrategy(Experiment(settings))
    strategy.start(grid)
    return strategy


def _exports(directory, n):
    return [load_state(directory / f"client-{k}") for k in range(n)]


@pytest.mark.parametrize("fresh_nodes", [False, True])
def test_a_restarted_server_resumes_a_personalised_run_with_nothing_lost(fresh_nodes, tmp_path):
    common = dict(num_rounds=4, dirichlet_alpha=0.3, personal="value")
    plain = toy(**common, personal_dir=str(tmp_path / "straight"))
    straight = _start(plain, InProcessGrid(client_app(), 4, plain.to_config()))
    settings = toy(**common, personal_dir=str(tmp_path / "resumed"), checkpoint_dir=str(tmp_path / "ckpt"))
    grid = InProcessGrid(client_app(), 4, settings.to_config())
    _crash_after_training(grid, 3)
    with pytest.raises(Crash):
        _start(settings, grid)
    assert json.loads((tmp_path / "ckpt" / "server.json").read_text())["round"] == 2  # round 3 is redone
    if fresh_nodes:  # as Flower starts a resumed run: new node state; the personal parts come from the nodes' disks
        grid = InProcessGrid(client_app(), 4, settings.to_config())
    resumed = _start(settings, grid)
    got, want = resumed.state.log, straight.state.log
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4, 4]
    for a, b in zip(got[1:5], want[1:5]):
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for a, b in zip(got[-1]["personalised"], want[-1]["personalised"], strict=True):
        assert a == pytest.approx(b)
    for a, b in zip(_exports(tmp_path / "resumed", 4), _exports(tmp_path / "straight", 4)):
        for path, tensors in b.tensors.items():
            for key, t in tensors.items():
                assert torch.allclose(a.tensors[path][key], t, atol=1e-6), (path, key)
    assert (json.loads((tmp_path / "resumed" / "users.json").read_text())
            == json.loads((tmp_path / "straight" / "users.json").read_text()))
    kept = sorted(p.name.split("-round-")[1] for p in (tmp_path / "resumed" / "client-0.rounds").iterdir())
    assert kept == ["3.safetensors", "4.safetensors"]  # the node's last two rounds, on its own disk


def test_without_personal_dir_a_fresh_node_restarts_its_personal_part_and_says_so(tmp_path, caplog):
    import logging

    settings = toy(num_rounds=3, personal="value", checkpoint_dir=str(tmp_path / "ckpt"))
    grid = InProcessGrid(client_app(), 4, settings.to_config())
    _crash_after_training(grid, 3)
    with pytest.raises(Crash):
        _start(settings, grid)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _start(settings, InProcessGrid(client_app(), 4, settings.to_config()))
    assert "no personal part from before round 3" in caplog.text
