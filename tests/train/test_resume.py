"""Checkpoints: stopping and resuming gives the same run, to the bit; atomic writes; mismatch errors."""

import json

import pytest
import torch
from conftest import adapter_like, tiny_task
from strategy_models import Crash, crash_at

from lorakit import zoo
from lorakit.data import byte_tokenizer
from lorakit.train import TrainConfig, fit
from lorakit.train.checkpoint import atomic_save, latest

# 36 examples, batch 4, accumulation 2 -> 5 steps an epoch; 8 steps cross an epoch boundary.
RUN = TrainConfig(
    lr=1e-2, batch_size=4, grad_accum_steps=2, max_steps=8, warmup_steps=2, log_every=1, save_every=3,
    eval_every=4, progress=False, seed=3,
)


def bert_with_dropout():
    """tiny-bert with dropout switched on, so the run depends on the torch RNG state."""
    model, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3, seed=1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return adapter_like(model, trainable=("classifier", "layer.1.attention.self.query")), tok


@pytest.fixture
def data():
    encoded = tiny_task(n=48).encode(byte_tokenizer(), max_length=24)
    return encoded["train"], encoded["validation"]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stop_and_resume_is_exact(data, tmp_path):
    straight, _ = bert_with_dropout()
    full = fit(straight, *data, config=RUN, output_dir=str(tmp_path / "a"))

    interrupted, _ = bert_with_dropout()
    with pytest.raises(Crash):
        fit(interrupted, *data, config=RUN, output_dir=str(tmp_path / "b"), callbacks=[crash_at(5)])
    assert latest(tmp_path / "b").name == "checkpoint-00000003.pt"

    resumed_model, _ = bert_with_dropout()
    resumed = fit(resumed_model, *data, config=RUN, output_dir=str(tmp_path / "b"), resume=True)

    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]  # tolerance 0
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]
    assert resumed.eval_metrics == full.eval_metrics
    for name, param in _trainable(straight).items():
        assert torch.equal(param, _trainable(resumed_model)[name]), name
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))  # steps 4-5 of the crashed run are not repeated


def test_resume_from_a_given_file_and_without_one(data, tmp_path):
    model, _ = bert_with_dropout()
    fit(model, *data, config=RUN, output_dir=str(tmp_path), max_steps=3)
    first = tmp_path / "checkpoint-00000003.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, "metrics.jsonl"]  # no temporaries left
    again, _ = bert_with_dropout()
    result = fit(again, *data, config=RUN, save_every=None, resume=str(first), max_steps=3)
    assert result.steps == 3 and len(result.history) == 3  # nothing left to do; history comes from the file
    fresh, _ = bert_with_dropout()
    assert fit(fresh, *data, config=RUN, output_dir=str(tmp_path / "new"), resume=True).steps == 8
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fit(fresh, *data, config=RUN, save_every=None, resume=str(tmp_path / "nope.pt"))


def test_resume_rejects_a_different_setup(data, tmp_path):
    model, _ = bert_with_dropout()
    fit(model, *data, config=RUN, output_dir=str(tmp_path), max_steps=3)
    path = tmp_path / "checkpoint-00000003.pt"
    other, _ = bert_with_dropout()
    adapter_like(other, trainable=("classifier",))
    with pytest.raises(ValueError, match="missing.*unexpected.*layer.1"):
        fit(other, *data, config=RUN, save_every=None, resume=str(path))
    state = torch.load(path, weights_only=False)
    state["world_size"] = 2
    torch.save(state, path)
    with pytest.raises(ValueError, match="2 processes"):
        fit(bert_with_dropout()[0], *data, config=RUN, save_every=None, resume=str(path))


def test_atomic_save_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
