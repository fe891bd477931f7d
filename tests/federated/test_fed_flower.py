"""The same apps on Flower's engines: the simulation engine (Ray) and a loopback deployment (a SuperLink and
SuperNodes as separate processes). Both must give the in-process run's numbers."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fedutil import toy

from lorakit.federated import runner
from lorakit.federated.local import run_in_process

pytest.importorskip("ray")


def _accuracies(rounds):
    return [round(r["accuracy"], 6) for r in rounds]


def test_simulation_engine_runs_the_apps_and_matches_the_in_process_run(tmp_path):
    settings = toy(strategy="flora", num_clients=3, num_rounds=2, client_ranks="2,4")
    history = runner.simulate(settings, workdir=str(tmp_path), timeout=600)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 and r["failed"] == 0 for r in rounds[1:])
    assert rounds[2]["downlink-tensor-bytes"] > rounds[1]["downlink-tensor-bytes"]  # round 2 ships round 1's stack
    reference = run_in_process(settings).state.log
    assert _accuracies(rounds) == _accuracies(reference)


def test_loopback_deployment_runs_the_apps_and_survives_a_node_that_leaves(tmp_path):
    settings = toy(strategy="flora", num_clients=3, num_rounds=3, min_replies=2, reply_timeout=300.0,
                   out_dir=str(tmp_path / "out"))
    history_file = Path(settings.out_dir) / "history.json"

    def stop_a_node_after_round_one(procs, supernodes):
        def watch():
            deadline = time.time() + 900
            while time.time() < deadline:
                if history_file.is_file() and json.loads(history_file.read_text())["rounds"][-1]["round"] >= 1:
                    supernodes[2].terminate()  # SuperNode 2 leaves mid-run
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()

    history = runner.deploy(settings, workdir=str(tmp_path), timeout=1200, on_started=stop_a_node_after_round_one)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["accepted"] == 3
    assert all(r["accepted"] == 2 and r["skipped"] == 0 for r in rounds[2:])
    reference = run_in_process(toy(strategy="flora", num_clients=3, num_rounds=1)).state.log
    assert _accuracies(rounds[:2]) == _accuracies(reference)


def test_secagg_and_personal_adapters_in_the_simulation_engine(tmp_path):
    """SecAgg+ gives the plain run's global within the quantisation error; the personalise messages reach the
    ClientApps, which write one adapter per client."""
    import numpy as np

    from lorakit.federated import checkpoint, secagg
    from lorakit.federated.experiment import Experiment
    from lorakit.federated.records import to_arrays

    settings = toy(num_clients=3, num_rounds=1, secagg=True, checkpoint_dir=str(tmp_path / "ckpt"), personal="value",
                   personal_dir=str(tmp_path / "personal"))
    history = runner.simulate(settings, workdir=str(tmp_path), timeout=600)
    assert history["rounds"][1]["accepted"] == 3 and history["rounds"][1]["skipped"] == 0
    assert [c["partition"] for c in history["rounds"][-1]["personalised"]] == [0, 1, 2]
    assert json.loads((tmp_path / "personal" / "users.json").read_text()) == {f"client-{k}": f"client-{k}" for k in range(3)}
    assert all((tmp_path / "personal" / f"client-{k}" / "adapter_config.json").is_file() for k in range(3))
    secure = {k: a.numpy() for k, a in to_arrays(checkpoint.load(settings.checkpoint_dir).adapter).items()}
    plain_run = run_in_process(toy(num_clients=3, num_rounds=1, personal="value"))
    plain = {k: a.numpy() for k, a in to_arrays(plain_run.state.adapter).items()}
    assert plain and not any(k.startswith("t/value/") for k in plain)
    shards = Experiment(settings).shards
    bound = secagg.error_bound([len(s) for s in shards], max(len(s) for s in shards), settings.secagg_clip_range)
    diff = max(float(np.abs(secure[k].astype(np.float64) - plain[k]).max()) for k in plain)
    assert 0 < diff <= bound + 1e-7


class Stop(Exception):
    pass


@pytest.mark.slow  # two deployments, a ClientApp process per message: about 6 minutes on two busy cores
def test_personal_adapters_in_a_loopback_deployment_that_restarts_mid_run(tmp_path):
    """Personalised run over SuperLink + SuperNodes; everything stops after round 1 and a new deployment resumes
    from the checkpoint (new Flower run, fresh node state: the nodes' personal parts come from their disks). The
    result is the in-process run that never stopped: per-round accuracy, exported adapters, users.json."""
    import torch

    from lorakit.formats.peft import load_state

    common = dict(num_clients=3, num_rounds=3, personal="value", dirichlet_alpha=0.3, reply_timeout=300.0)
    settings = toy(**common, checkpoint_dir=str(tmp_path / "ckpt"), personal_dir=str(tmp_path / "personal"),
                   out_dir=str(tmp_path / "out"))

    def stop_after_round_one(record):
        if record["round"] >= 1:
            raise Stop

    with pytest.raises(Stop):
        runner.deploy(settings, workdir=str(tmp_path / "first"), timeout=900, on_round=stop_after_round_one)
    done = json.loads((tmp_path / "ckpt" / "server.json").read_text())["round"]
    assert 1 <= done < 3
    rounds = runner.deploy(settings, workdir=str(tmp_path / "second"), timeout=900)["rounds"]
    straight = run_in_process(toy(**common, personal_dir=str(tmp_path / "straight"))).state.log
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 3]
    assert _accuracies(rounds[:4]) == _accuracies(straight[:4])
    assert [c["partition"] for c in rounds[-1]["personalised"]] == [0, 1, 2]
    for a, b in zip(rounds[-1]["personalised"], straight[-1]["personalised"]):
        assert a == pytest.approx(b)
    users = json.loads((tmp_path / "personal" / "users.json").read_text())
    assert users == {f"client-{k}": f"client-{k}" for k in range(3)}
    for k in range(3):
        got, want = load_state(tmp_path / "personal" / f"client-{k}"), load_state(tmp_path / "straight" / f"client-{k}")
        assert all(torch.allclose(got.tensors[p][key], t, atol=1e-6) for p, ts in want.tensors.items()
                   for key, t in ts.items())
