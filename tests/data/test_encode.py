"""Tokenisation and dynamic-padding collation for classification and causal LM."""

import torch

from lorakit.data import IGNORE_INDEX, byte_tokenizer, encode


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve 🙂 tweet\n"
    ids = tok(text)["input_ids"]
    assert len(tok) == 260 and ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_classification_batches_pad_to_the_longest():
    tok = byte_tokenizer()
    data = encode([{"text": "abc", "label": 1}, {"text": "a", "label": 0}], tok, kind="classification", max_length=3)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].tolist() == [data[0]["input_ids"], data[1]["input_ids"] + [tok.pad_token_id]]
    assert batch["input_ids"].shape == (2, 3)  # bos + "ab": truncated to max_length
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert data.collate([data[1]])["input_ids"].shape == (1, 2)  # dynamic: no padding in a batch of one


def test_causal_lm_labels_cover_only_the_completion():
    tok = byte_tokenizer()
    data = encode([{"prompt": "Q:", "completion": "ok"}, {"prompt": "", "completion": "x"}], tok, kind="causal_lm")
    first = data[0]
    # <bos> Q : | o k <eos>
    assert first["input_ids"] == tok("Q:")["input_ids"] + tok("ok", add_special_tokens=False)["input_ids"] + [2]
    assert first["labels"] == [IGNORE_INDEX] * 3 + first["input_ids"][3:]
    batch = data.collate([data[0], data[1]])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, data[1]["input_ids"][1], 2] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"].sum().item() == 6 + 3


def test_causal_lm_truncation_keeps_the_completion_end_of_prompt():
    tok = byte_tokenizer()
    data = encode([{"prompt": "abcdefgh", "completion": "XY"}], tok, kind="causal_lm", max_length=5)
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    assert len(ids) == 5
    assert tok.decode(ids) == "gh" + "XY" + "<eos>"
    assert labels[:2] == [IGNORE_INDEX] * 2 and labels[2:] == ids[2:]
    long = encode([{"prompt": "p", "completion": "0123456789"}], tok, kind="causal_lm", max_length=4)[0]
    assert len(long["input_ids"]) == 4 and long["labels"][0] == IGNORE_INDEX
    assert sum(y != IGNORE_INDEX for y in long["labels"]) == 3


def test_task_encode_uses_the_pad_id():
    from lorakit.data import Task

    tok = byte_tokenizer()
    task = Task("classification", [{"text": "hi", "label": 0}], [], [], ("a",))
    encoded = task.encode(tok, max_length=8)
    assert set(encoded) == {"train", "validation", "test"}
    assert encoded["train"].pad_token_id == tok.pad_token_id
    assert isinstance(encoded["train"].collate([encoded["train"][0]])["input_ids"], torch.Tensor)
