"""Instruction tuning data: chat records through the chat template (loss on the answer only), packing that keeps
examples apart, bundled classification tasks as causal tasks, and the generation metric."""
import pytest
import torch

from lorakit import zoo
from lorakit.data.chat import as_causal
from lorakit.data.encode import IGNORE_INDEX, encode
from lorakit.data.packing import pack
from lorakit.data.task import Task, from_records
from lorakit.train.generation import _f1, generation_metrics

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHATS = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]},
         {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi?"},
                       {"role": "assistant", "content": "Hello there"}]}]


@pytest.fixture(scope="module")
def llama():
    model, tok = zoo.load("tiny-llama", "causal_lm", seed=0)
    return model.eval(), tok


def test_chat_records_train_on_the_answer_only(llama):
    _, tok = llama
    tok.chat_template = TEMPLATE
    task = from_records({"train": CHATS * 5}, "causal_lm")
    data = encode(task.train[:2], tok, kind="causal_lm")
    for f, chat in zip(data.features, CHATS):
        target = [t for t, y in zip(f["input_ids"], f["labels"]) if y != IGNORE_INDEX]
        assert tok.decode(target) == chat["messages"][-1]["content"] + "</s>"
        assert f["labels"][: len(f["labels"]) - len(target)] == [IGNORE_INDEX] * (len(f["labels"]) - len(target))


def test_bad_chat_input_is_refused_before_training(llama):
    _, tok = llama
    with pytest.raises(ValueError, match="record 1 has no 'messages'"):
        from_records({"train": [CHATS[0], {"messages": []}] * 3}, "causal_lm", source="chat.jsonl")
    with pytest.raises(ValueError, match="last message must be the assistant"):
        from_records({"train": [{"messages": CHATS[0]["messages"][:1]}] * 3}, "causal_lm")
    with pytest.raises(ValueError, match="role in"):
        from_records({"train": [{"messages": [{"role": "robot", "content": "x"}]}] * 3}, "causal_lm")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode([{"messages": CHATS[0]["messages"]}], tok, kind="causal_lm")


def _examples(tok):
    rows = [("The cat", " sat down"), ("Two plus two is", " four"), ("Hello", " world, again and again"),
            ("A", " b"), ("Colours: red,", " green, blue")]
    return encode([{"prompt": p, "completion": c} for p, c in rows], tok, kind="causal_lm")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_packed_row_computes_what_its_examples_compute_alone(name):
    """Catches: one causal mask over the whole row (examples see each other), positions not restarted (GPT-2's
    absolute positions; under RoPE a shifted example computes the same)."""
    model, tok = zoo.load(name, "causal_lm", seed=0)
    model.eval()
    data = _examples(tok)
    packed = pack(data, max_length=32)
    assert len(packed) < len(data)
    batch = packed.collate(packed.features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        seen = []
        for row, packed_row in enumerate(packed.features):
            start = 0
            for i in packed_row["examples"]:
                f = data.features[i]
                k = len(f["input_ids"])
                alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[row, start:start + k], alone, rtol=1e-4, atol=1e-4)
                start, seen = start + k, seen + [i]
        assert sorted(seen) == list(range(len(data)))
        unpacked = data.collate(data.features)
        loss_alone = model(**unpacked).loss
        loss_packed = model(**batch).loss
    torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-5)


def test_packing_refuses_what_does_not_fit(llama):
    _, tok = llama
    with pytest.raises(ValueError, match="more than the packed row's 4"):
        pack(_examples(tok), max_length=4)


def test_classification_tasks_become_causal_tasks():
    task = Task("classification", [{"text": "a dog", "label": 1}], [], [{"text": "a fir", "label": 0}], ("plant", "animal"))
    causal = as_causal(task)
    assert causal.kind == "causal_lm"
    assert causal.train == [{"prompt": "a dog\nAnswer:", "completion": " animal"}]
    assert causal.test[0]["completion"] == " plant"


def test_generation_metrics_score_the_answer_not_the_prompt(llama):
    model, tok = llama
    prompt = "Once upon"
    ids = tok(prompt)["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    greedy = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    right = generation_metrics(model, tok, [{"prompt": prompt, "completion": " " + greedy}], max_new_tokens=4)
    wrong = generation_metrics(model, tok, [{"prompt": prompt, "completion": prompt + " " + greedy}], max_new_tokens=4)
    assert right["exact_match"] == 1.0 and right["token_f1"] == 1.0
    assert wrong["exact_match"] == 0.0
    assert _f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_train_cli_packs_and_scores_generations(tmp_path, capsys):
    import json

    from lorakit.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) for w in
                              ["red", "blue", "green", "cyan", "gold", "pink", "grey", "teal", "navy", "lime"] * 2))
    code = main(["train", "--model", "tiny-llama", "--kind", "causal_lm", "--task", str(data), "--targets",
                 "q_proj,v_proj", "--max-steps", "2", "--batch-size", "2", "--pack", "--max-length", "32",
                 "--eval-generate", "2", "-o", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"exact_match", "token_f1", "loss"} <= set(summary["test"])
    assert main(["train", "--model", "tiny-llama", "--task", str(data), "--pack", "-o", str(tmp_path / "x")]) == 2
    assert "causal_lm" in capsys.readouterr().err
