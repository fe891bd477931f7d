"""The chat recipe: instruction tuning of a causal LM across clients (tiny Llama), heterogeneous ranks, answer loss
and the generation metric, chat data from a file."""
from __future__ import annotations

import json

import pytest
from fedutil import run

from lorakit.federated.experiment import Experiment, Settings

CHAT = dict(task="chat", num_clients=3, num_rounds=2, local_steps=6, batch_size=8, lr=5e-2, rank=4, lora_alpha=8.0,
            targets="q_proj,v_proj,o_proj,down_proj", max_train=120, max_eval=12, gen_examples=4, max_length=48,
            min_replies=2, eval_every=1)


def test_heterogeneous_ranks_train_a_causal_lm_and_report_loss_and_generation():
    strategy, sent, _ = run(Settings(**{**CHAT, "strategy": "flora", "client_ranks": "2,4,8"}))
    ranks = {p: reply.content["arrays"]["t/model.layers.0.self_attn.q_proj/lora_A.weight"].numpy().shape[0]
             for _, p, reply in sent}
    assert ranks == {0: 2, 1: 4, 2: 8}
    log = strategy.state.log
    assert all({"loss", "exact-match", "token-f1", "accuracy"} <= set(r) for r in log)
    assert all(0 <= r["exact-match"] <= 1 and 0 <= r["token-f1"] <= 1 for r in log)
    assert log[2]["loss"] < 0.97 * log[0]["loss"]  # the answers' loss falls
    assert all(r["accepted"] == 3 and r["aggregation-error"] < 1e-5 for r in log[1:])  # FLoRA stacks exactly


def test_chat_records_from_a_file_split_by_their_category(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{c} {i}?"}, {"role": "assistant", "content": c}],
             "category": c} for i in range(30) for c in ("red", "blue")]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    exp = Experiment(Settings(**{**CHAT, "data": str(tmp_path / "chat.jsonl"), "dirichlet_alpha": 0.05,
                                 "max_train": 40, "max_eval": 10}))
    assert exp.settings.model == "tiny-llama" and exp.num_classes == 2
    assert exp.adapter_config().modules_to_save is None  # a causal LM has no head to save
    mixes = [sorted({exp.categories[i] for i in shard}) for shard in exp.shards]
    assert any(len(m) == 1 for m in mixes)  # alpha 0.05: some client holds one colour only
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match="needs chat records"):
        Experiment(Settings(**{**CHAT, "data": str(tmp_path / "pc.jsonl"), "max_train": 1, "max_eval": 1,
                               "num_clients": 1, "min_replies": 1}))


def test_an_encoder_is_refused_for_the_chat_task():
    with pytest.raises(ValueError, match="needs a causal LM"):
        Experiment(Settings(**{**CHAT, "model": "tiny-bert"}))
