"""IncreLoRA: ranks grow where importance is highest up to the budget; saves a PEFT LoRA with rank_pattern that
peft loads to the same outputs; growth keeps the function; exact resume; budget errors before training."""
import pytest
import torch
from strategy_models import Crash, crash_at, data, lora4

import lorakit
from lorakit.train import TrainConfig, fit
from lorakit.train.schedules import IncreLoRA

RUN = TrainConfig(lr=5e-3, batch_size=5, max_steps=8, warmup_steps=0, log_every=1, progress=False, seed=1)


def schedule():
    return IncreLoRA(budget=24, add_r=2, top_h=2, init_warmup=2, interval=2)


def test_budget_below_the_starting_rank_is_an_error_before_training():
    with pytest.raises(ValueError, match="budget 8 .* below the starting total rank 16"):
        fit(lora4(), data()[0], config=RUN, adapter_schedule=IncreLoRA(budget=8))


def test_ranks_grow_unevenly_to_the_budget_and_save_as_peft_with_rank_pattern(tmp_path):
    from peft import PeftModel
    from strategy_models import llama4

    model, (train, val) = lora4(), data()
    sched = schedule()
    fit(model, train, config=RUN, adapter_schedule=sched)
    ranks = {p: a.r for p, a in lorakit.adapters(model).items()}
    assert sum(ranks.values()) == 24 and len(set(ranks.values())) > 1 and min(ranks.values()) == 2
    for path, adapter in lorakit.adapters(model).items():
        assert adapter.lora_A.weight.shape[0] == ranks[path] == adapter.lora_B.weight.shape[1]  # no reserve left

    out = lorakit.save_peft(model, tmp_path / "adapter")
    batch = train.collate([train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = PeftModel.from_pretrained(llama4(), str(out)).eval()(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    import json

    saved = json.loads((out / "adapter_config.json").read_text())
    assert {p: saved["rank_pattern"].get(p, saved["r"]) for p in ranks} == ranks


def test_growth_keeps_the_function():
    model, (train, _) = lora4(), data()
    sched = schedule()
    sched.prepare(model)
    with torch.no_grad():
        for a in lorakit.adapters(model).values():
            a.lora_B.weight[:, :2].normal_()  # the active ranks; reserves keep B = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = train.collate([train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    sched.ipt = {p: float(i) for i, p in enumerate(sched.modules)}
    sched.unc = {p: 1.0 for p in sched.modules}
    assert sched.step_end(3, model, opt)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert sorted(sched.ranks.values())[-2:] == [4, 4]


def test_kill_and_resume_gives_the_same_adapter(tmp_path):
    train = data()[0]
    straight = lora4()
    fit(straight, train, config=RUN, adapter_schedule=schedule(), output_dir=str(tmp_path / "a"), save_every=3)
    broken = lora4()
    with pytest.raises(Crash):
        fit(broken, train, config=RUN, adapter_schedule=schedule(), output_dir=str(tmp_path / "b"), save_every=3,
            callbacks=[crash_at(7)])
    resumed = lora4()
    fit(resumed, train, config=RUN, adapter_schedule=schedule(), output_dir=str(tmp_path / "b"), save_every=3, resume=True)
    a, b = lorakit.AdapterState.from_model(straight), lorakit.AdapterState.from_model(resumed)
    assert a.config.rank_pattern == b.config.rank_pattern
    for path in a.modules():
        for key, t in a.tensors[path].items():
            assert torch.equal(t, b.tensors[path][key]), (path, key)


def test_grows_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lorakit.train.schedules import trainer_callback

    model, train = lora4(), data()[0]
    sched = IncreLoRA(budget=20, add_r=2, top_h=2, init_warmup=1, interval=1)
    sched.prepare(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=5, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=5e-3)
    Trainer(model=model, args=args, train_dataset=train, data_collator=train.collate,
            callbacks=[trainer_callback(sched)]).train()
    ranks = {p: a.r for p, a in lorakit.adapters(model).items()}
    assert sum(ranks.values()) == 20 and max(ranks.values()) > 2
    grown = [a for a in lorakit.adapters(model).values() if a.r > 2]
    assert all(a.lora_B.weight[:, 2:].abs().sum() > 0 for a in grown)  # the grown ranks trained after growth
