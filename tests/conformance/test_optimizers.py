"""Conformance: every registered optimiser reduces a toy loss in one step, resumes bit-exactly from its
state_dict, and trains inside transformers.Trainer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from transformers.utils import ModelOutput
from lorakit.optim import OPTIMIZERS, create


class Toy(nn.Module):
    """Two linear layers and a head; returns an object with ``.loss`` like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 1)

    def forward(self, x, labels=None):
        out = self.head(torch.tanh(self.down(torch.tanh(self.up(x))))).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return ModelOutput(loss=loss, logits=out)


def toy_model(seed=0):
    torch.manual_seed(seed)
    model = Toy()
    # s = 1 and no dropout (ALLoRA's definition); B random (init False) so A gets gradients from step one
    config = lorakit.LoRAConfig(r=2, lora_alpha=2, target_modules=["up", "down"], init_lora_weights=False,
                                modules_to_save=["head"])
    return lorakit.apply(model, config)


def toy_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    return {"x": x, "labels": torch.sin(x.sum(-1))}


def _step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_one_step_reduces_the_loss(name):
    model, batch = toy_model(), toy_batch()
    opt = create(name, model, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    first = _step(model, opt, batch)
    with torch.no_grad():
        assert model(**batch).loss.item() < first
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and any("head" in n for n in moved)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_state_dict_round_trip_resumes_bit_exactly(name):
    model, batches = toy_model(), [toy_batch(s) for s in range(6)]
    opt = create(name, model, lr=1e-2, weight_decay=0.01)
    for b in batches[:3]:
        _step(model, opt, b)
    saved_params, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for b in batches[3:]:
        _step(model, opt, b)

    resumed = toy_model()
    resumed.load_state_dict(saved_params)
    opt2 = create(name, resumed, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved_opt)
    for b in batches[3:]:
        _step(resumed, opt2, b)
    for (n, p), (_, q) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_trains_inside_transformers_trainer(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = toy_model()
    data = [{"x": x, "labels": y} for x, y in zip(*toy_batch().values())]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = create(name, model, lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    out = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert out.global_step == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    stepped = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == stepped and any("lora_B" in n for n in changed)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_registered_entry_is_documented(name):
    cls = OPTIMIZERS.get(name)
    assert issubclass(cls, torch.optim.Optimizer) and cls.summary and cls.__doc__


def test_unknown_name_and_option_are_clear_errors():
    model = toy_model()
    with pytest.raises(KeyError, match="Registered: adamw"):
        create("lora_pr", model, lr=1e-3)
    with pytest.raises(ValueError, match="has no option ratio; its options: lr_ratio"):
        create("lora_plus", model, lr=1e-3, ratio=4)
