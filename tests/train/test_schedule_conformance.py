"""Every registered schedule: documented, built by name with its defaults, trains a few steps inside fit, and
leaves a model that saves (PEFT for adapter schedules) and reloads to the same outputs."""
import pytest
import torch
from strategy_models import data, llama4, lora4

import lorakit
from lorakit.train import fit
from lorakit.train.schedules import SCHEDULES, Schedule, create

OPTIONS = {"lisa": dict(gamma=1, interval=2), "increlora": dict(budget=20, init_warmup=1, interval=1),
           "diffora": dict(keep=3, search_steps=2)}


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule_trains_and_saves(name, tmp_path):
    cls = SCHEDULES.get(name)
    assert issubclass(cls, Schedule) and cls.summary and cls.__doc__ and name in OPTIONS
    train, val = data()
    options = dict(OPTIONS[name], **({"search_data": val} if name == "diffora" else {}))
    model = llama4() if name == "lisa" else lora4()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, train, val, max_steps=4, batch_size=5, progress=False, adapter_schedule=create(name, **options))
    assert result.steps == 4 and result.eval_metrics["loss"] == result.eval_metrics["loss"]
    assert any(n in before and not torch.equal(p, before[n]) for n, p in model.named_parameters())
    batch = train.collate([train[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
    if name == "lisa":
        model.save_pretrained(tmp_path)
        from transformers import LlamaForSequenceClassification

        again = LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    else:
        lorakit.save_peft(model, tmp_path)
        again = lorakit.load_peft(llama4(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, ours, atol=1e-5)
