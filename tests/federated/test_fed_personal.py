"""Personalised federated adapters (FedPer): personal modules stay on the clients, each client's adapter is
exported as PEFT and served per user over loopback HTTP with the outputs of that PEFT adapter."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fedutil import aggregate_of, run, toy

from lorakit.federated import update_of
from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Settings
from lorakit.federated.records import from_arrays
from lorakit.formats.peft import load_state


def test_personal_modules_never_leave_a_node_and_the_export_joins_them_with_the_final_global(tmp_path):
    settings = toy(num_rounds=2, dirichlet_alpha=0.3, personal="value", personal_dir=str(tmp_path))
    strategy, sent, grid = run(settings)
    assert all(not k.startswith("t/value/") for _, _, r in sent for k in r.content["arrays"].keys())
    assert any(k.startswith("t/query/") for k in sent[0][2].content["arrays"].keys())
    final = strategy.state.adapter  # the aggregate of the query LoRA and the head, nothing of value
    assert set(final.tensors) == {"query"}
    want = aggregate_of(strategy, sent, 2, {0, 1, 2, 3})
    assert torch.allclose(update_of(final, "query"), update_of(want, "query"), atol=1e-6)
    assert json.loads((tmp_path / "users.json").read_text()) == {f"client-{k}": f"client-{k}" for k in range(4)}
    own = []
    for k in range(4):
        exported = load_state(tmp_path / f"client-{k}")
        kept = from_arrays(grid.contexts[k + 1].state["personal"], exported.config)
        assert torch.equal(exported.tensors["value"]["lora_B.weight"], kept.tensors["value"]["lora_B.weight"])
        assert torch.equal(exported.tensors["query"]["lora_A.weight"], final.tensors["query"]["lora_A.weight"])
        assert torch.equal(exported.modules_to_save["classifier"]["weight"], final.modules_to_save["classifier"]["weight"])
        own.append(exported.tensors["value"]["lora_B.weight"])
    assert not torch.equal(own[0], own[1])  # each client kept its own
    clients = strategy.state.log[-1]["personalised"]
    assert [c["partition"] for c in clients] == [0, 1, 2, 3]
    assert all(0 <= c["personal-accuracy"] <= 1 and 0 <= c["global-accuracy"] <= 1 for c in clients)
    assert any(c["personal-accuracy"] != c["global-accuracy"] for c in clients)


def test_a_restarting_strategy_is_refused_with_personal_modules():
    with pytest.raises(ValueError, match="restarting strategy 'flora'"):
        toy(personal="value", strategy="flora")


@pytest.mark.parametrize("changes,match", [
    (dict(personal="o_proj"), "o_proj name no adapted or saved module"),
    (dict(personal="query,value,classifier"), "nothing would be federated"),
])
def test_invalid_personal_settings_are_refused(changes, match, tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in toy(num_rounds=1, **changes).to_config().items()
            if v not in ("", False)]
    assert cli_main(["run", "--engine", "inprocess", *args, "-o", str(tmp_path / "out")]) == 2
    assert match in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_client_is_served_its_own_adapter_over_loopback_with_its_peft_outputs(tmp_path):
    import uvicorn
    from peft import PeftModel

    from lorakit import zoo
    from lorakit.serve.cli import build_engine
    from lorakit.serve.server import build_app
    from lorakit.serve.users import UserAdapters

    pdir = tmp_path / "personal"
    settings = Settings(task="chat", num_clients=2, num_rounds=1, local_steps=3, batch_size=4, lr=5e-2, rank=4,
                        lora_alpha=8.0, targets="q_proj,v_proj,o_proj", personal="o_proj", max_train=40, max_eval=6,
                        gen_examples=2, max_length=48, min_replies=2, dirichlet_alpha=0.5, personal_dir=str(pdir))
    run(settings)
    engine = build_engine("tiny-llama", str(pdir), seed=settings.seed, max_batch=2, max_len=96, pool_bytes=1 << 20)
    users = UserAdapters.load(pdir / "users.json", engine.store.names())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine.start(), "tiny-llama", users=users), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        answers = {}
        for user in ("client-0", "client-1"):
            body = {"model": "per-user", "user": user, "prompt": "u:Sentiment of this tweet: late again", "max_tokens": 5,
                    "temperature": 0, "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True}
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answers[user] = r.json()["choices"][0]["logprobs"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
    assert answers["client-0"]["token_logprobs"] != answers["client-1"]["token_logprobs"]
    for user, lp in answers.items():
        base, tokenizer = zoo.load("tiny-llama", "causal_lm", seed=settings.seed)
        model = PeftModel.from_pretrained(base, str(pdir / user)).eval()
        ids = tokenizer("u:Sentiment of this tweet: late again")["input_ids"]
        out = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        with torch.no_grad():
            ref = model(torch.tensor([ids + out])).logits[0].float().log_softmax(-1)
        for j, tok in enumerate(out):
            row = ref[len(ids) - 1 + j]
            assert int(row.argmax()) == tok  # greedy under this client's PEFT adapter
            assert lp["token_logprobs"][j] == pytest.approx(row[tok].item(), abs=1e-4)


def test_fed_run_writes_the_personalised_adapters_under_out(tmp_path, capsys):
    args = ["run", "--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "1", "--local-steps",
            "2", "--max-train", "120", "--max-eval", "60", "--rank", "4", "--personal", "value", "-o", str(tmp_path)]
    assert cli_main(args) == 0
    users = json.loads((tmp_path / "personal" / "users.json").read_text())
    assert sorted(users) == ["client-0", "client-1", "client-2"]
    assert all((tmp_path / "personal" / name / "adapter_config.json").is_file() for name in users.values())
    out = capsys.readouterr().out
    assert "client 2: personalised accuracy" in out and "--user-adapters" in out
    assert not (tmp_path / "adapter").exists()  # the global part alone is no complete adapter


@pytest.mark.parametrize("kind", ["nan", "rank", "base"])
def test_bad_updates_are_rejected_with_personal_modules_and_the_round_goes_on(kind, caplog):
    import logging

    from test_fed_faults import BAD

    def corrupt(msg, context, reply):
        return BAD[kind](reply) if int(context.node_config["partition-id"]) == 0 else reply

    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, sent, _ = run(toy(num_rounds=1, personal="value"), fault=corrupt)
    record = strategy.state.log[1]
    assert (record["accepted"], record["rejected"]) == (3, 1) and "rejected the update of node 1" in caplog.text
    want = aggregate_of(strategy, sent, 1, {1, 2, 3})
    assert torch.allclose(update_of(strategy.state.adapter, "query"), update_of(want, "query"), atol=1e-6)
