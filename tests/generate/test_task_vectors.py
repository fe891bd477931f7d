"""Task vectors and pooled features: padding in a batch does not change a text's row."""
from __future__ import annotations

import pytest
import torch

from lorakit import zoo as models
from lorakit.generate.features import hidden_mean
from lorakit.generate.icm_lora import demonstrations


@pytest.mark.parametrize("name, task, causal", [("tiny-llama", "causal_lm", True), ("tiny-bert", "seq_cls", False)])
def test_batched_rows_equal_unpadded_ones(name, task, causal):
    model, tokenizer = models.load(name, task=task)
    texts = ["ab", "a longer text here"]
    batched = hidden_mean(model, tokenizer, texts, causal=causal)
    for text, row in zip(texts, batched):
        with torch.no_grad():
            ids = tokenizer([text], return_tensors="pt")
            hidden = model.base_model(input_ids=ids["input_ids"]).last_hidden_state[0]
        torch.testing.assert_close(row, hidden[-1] if causal else hidden.mean(0), rtol=1e-4, atol=1e-5)


def test_demonstrations_take_classes_in_turn():
    rows = [{"text": t, "label": y} for t, y in (("a", 0), ("b", 0), ("c", 0), ("d", 1))]
    assert demonstrations(rows, ("no", "yes"), 3) == ["no: a", "yes: d", "no: b"]
