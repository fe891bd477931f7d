"""fit with every registered optimiser: it trains, and a run killed after a checkpoint resumes to the same adapter."""
import pytest
import torch
from conftest import tiny_task

import lorakit
from lorakit import zoo
from lorakit.data import byte_tokenizer
from lorakit.optim import OPTIMIZERS
from lorakit.train import TrainConfig, fit

RUN = TrainConfig(lr=5e-3, batch_size=6, max_steps=4, warmup_steps=1, log_every=1, save_every=2, progress=False, seed=2)


class Crash(Exception):
    pass


def _crash(current, record):
    if current == 3:
        raise Crash


def lora_model():
    model, _ = zoo.load("tiny-llama", "seq_cls", num_labels=3, seed=0)
    torch.manual_seed(0)  # the adapter initialisation draws from the global generator
    return lorakit.apply(model, lorakit.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                   task_type="SEQ_CLS"))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_fit_with_optimizer_resumes_exactly(name, tmp_path):
    train = tiny_task(n=32).encode(byte_tokenizer(), max_length=16)["train"]
    straight = lora_model()
    result = fit(straight, train, config=RUN, optimizer=name, output_dir=str(tmp_path / "a"))
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)

    broken = lora_model()
    with pytest.raises(Crash):
        fit(broken, train, config=RUN, optimizer=name, output_dir=str(tmp_path / "b"), callbacks=[_crash])
    resumed = lora_model()
    fit(resumed, train, config=RUN, optimizer=name, output_dir=str(tmp_path / "b"), resume=True)
    a, b = lorakit.AdapterState.from_model(straight), lorakit.AdapterState.from_model(resumed)
    for path in a.modules():
        for key, t in a.tensors[path].items():
            assert torch.equal(t, b.tensors[path][key]), (path, key)


def test_unknown_optimizer_fails_before_training():
    with pytest.raises(KeyError, match="unknown optimiser 'sgdx'.*Registered: adamw"):
        fit(lora_model(), [1], optimizer="sgdx")
