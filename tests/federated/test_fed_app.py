"""The ServerApp strategy and the ClientApp, run in one process (``InProcessGrid``): what travels, what is
aggregated, catch-up of restarting strategies, bytes per round."""
from __future__ import annotations

import pytest
import torch
from fedutil import around_rounds, client_app, toy

from lorakit.federated import STRATEGIES, aggregate, update_of
from lorakit.federated.experiment import Experiment
from lorakit.federated.local import InProcessGrid, run_in_process
from lorakit.federated.protocol import fold_deltas
from lorakit.federated.records import payload
from lorakit.federated.server_app import LoRAStrategy

HEAD = 32 * 3 + 3  # the toy classifier's weight and bias
LORA = 2 * 64  # two 32x32 modules: r (in + out) scalars per rank unit


def _run(settings):
    sent = []
    grid = InProcessGrid(client_app(sent=sent), settings.num_clients, settings.to_config())
    return run_in_process(settings, grid=grid), sent, grid


def _last_round(strategy, sent):
    rnd = max(r for r, _, _ in sent)
    replies = sorted((p, reply) for r, p, reply in sent if r == rnd)
    parsed = [strategy.parse(reply) for _, reply in replies]
    return [x[0] for x in parsed], [x[1] for x in parsed]


@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_the_global_adapter_is_the_registered_aggregate_of_what_clients_sent(name):
    ranks = "2,4,8" if STRATEGIES.get(name).mixed_ranks else ""
    strategy, sent, _ = _run(toy(strategy=name, client_ranks=ranks))
    log = strategy.state.log
    assert [r["round"] for r in log] == [0, 1, 2] and all(r["accepted"] == 4 for r in log[1:])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in log)
    exact = name in ("flora", "ffa_lora", "fedavg_dense")
    assert all((r["aggregation-error"] < 1e-5) == exact for r in log[1:]), [r["aggregation-error"] for r in log[1:]]
    states, counts = _last_round(strategy, sent)
    want = aggregate(name, states, counts)
    got = strategy.state.history[2] if STRATEGIES.get(name).restart else strategy.state.adapter
    for path in want.tensors:
        assert torch.allclose(update_of(got, path), update_of(want, path), atol=1e-6)
    assert torch.equal(strategy.state.adapter.modules_to_save["classifier"]["weight"],
                       want.modules_to_save["classifier"]["weight"])


def test_only_adapter_tensors_leave_a_client():
    _, sent, _ = _run(toy(strategy="fedit", num_rounds=1))
    for _, _, reply in sent:
        keys = set(reply.content["arrays"].keys())
        assert keys == {f"t/{m}/lora_{x}.weight" for m in ("query", "value") for x in "AB"} | {
            "m/classifier/weight", "m/classifier/bias"}


def test_ffa_lora_sends_b_only_and_keeps_a_at_the_shared_init():
    strategy, sent, grid = _run(toy(strategy="ffa_lora", client_ranks="2,4,8"))
    assert all("lora_A" not in k for _, _, reply in sent for k in reply.content["arrays"].keys())
    ref = strategy.reference.tensors
    for path, tensors in strategy.state.adapter.tensors.items():
        assert torch.equal(tensors["lora_A.weight"], ref[path]["lora_A.weight"])
    states, _ = _last_round(strategy, sent)
    for s in states:  # each client's A is the leading rows of the one shared A
        r = s.config.r
        assert torch.equal(s.tensors["query"]["lora_A.weight"], ref["query"]["lora_A.weight"][:r])


def test_a_flora_node_that_missed_rounds_catches_up_exactly():
    settings = toy(strategy="flora", num_rounds=3)
    grid = InProcessGrid(client_app(), 4, settings.to_config())

    strategy = LoRAStrategy(Experiment(settings))
    around_rounds(strategy, before=lambda rnd: setattr(grid, "offline", {4} if rnd == 2 else set()))
    strategy.start(grid)
    assert [r["accepted"] for r in strategy.state.log[1:]] == [4, 3, 4]
    model, deltas = strategy.exp.base_model(), {}
    for rnd in (1, 2):
        fold_deltas(deltas, model, strategy.state.history[rnd])
    for node in (1, 4):  # node 4 skipped round 2 and folded rounds 1 and 2 at once in round 3
        stored = grid.contexts[node].state["merged"]
        for path, delta in deltas.items():
            assert torch.allclose(torch.from_numpy(stored[path].numpy()), delta, atol=1e-6)
    assert int(grid.contexts[4].state["sync"]["base-round"]) == 2


def test_mixed_rank_clients_send_their_own_rank():
    strategy, sent, _ = _run(toy(strategy="flora", client_ranks="2,4,8", num_rounds=1))
    for _, partition, reply in sent:
        r = [2, 4, 8][partition % 3]
        assert payload(reply.content["arrays"])["params"] == r * LORA + HEAD


@pytest.mark.parametrize("name,up,down", [
    ("fedit", lambda r: r * LORA + HEAD, lambda r, rnd, k: r * LORA + HEAD),
    ("ffa_lora", lambda r: r * LORA // 2 + HEAD, lambda r, rnd, k: r * LORA // 2 + HEAD),
    # FLoRA: the head every round, plus last round's stack (sum of client ranks) from round 2 on
    ("flora", lambda r: r * LORA + HEAD, lambda r, rnd, k: HEAD + (k * r * LORA if rnd > 1 else 0)),
])
def test_bytes_per_round_match_the_formulas(name, up, down):
    k, r = 4, 4
    strategy, _, _ = _run(toy(strategy=name, num_rounds=2))
    for record in strategy.state.log[1:]:
        assert record["uplink-tensor-bytes"] == 4 * k * up(r)
        assert record["downlink-tensor-bytes"] == 4 * k * down(r, record["round"], k)
        assert record["uplink-bytes"] > record["uplink-tensor-bytes"]  # headers and keys on top
