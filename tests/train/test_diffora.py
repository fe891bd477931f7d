"""DiffoRA: gates over candidate modules learn on held-out data, the top-k modules keep LoRA (function kept at
discretisation), the result saves as a PEFT LoRA on the chosen modules; errors before training; exact resume."""
import pytest
import torch
from strategy_models import Crash, crash_at, data, llama4, lora4

import lorakit
from lorakit.train import TrainConfig, fit
from lorakit.train.schedules import DiffoRA

RUN = TrainConfig(lr=5e-3, batch_size=5, max_steps=6, warmup_steps=0, log_every=1, progress=False, seed=1)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def schedule(val, **kw):
    return DiffoRA(**{"keep": 4, "search_steps": 3, "search_data": val, "batch_size": 5, **kw})


def test_bad_settings_fail_before_training():
    train, val = data()
    with pytest.raises(ValueError, match="keep=17 modules, but there are 16 candidates"):
        fit(lora4(targets=TARGETS), train, config=RUN, adapter_schedule=schedule(val, keep=17))
    with pytest.raises(ValueError, match="search_data"):
        fit(lora4(targets=TARGETS), train, config=RUN, adapter_schedule=schedule(None))


def test_search_moves_the_gates_and_keeps_the_chosen_modules(tmp_path):
    from peft import PeftModel

    (train, val), model = data(), lora4(targets=TARGETS)
    sched = schedule(val)
    fit(model, train, config=RUN, adapter_schedule=sched)
    assert len(lorakit.adapters(model)) == 4 and sorted(lorakit.adapters(model)) == sched.chosen
    assert len(set(sched.scores().values())) > 1  # the gates learned different values
    out = lorakit.save_peft(model, tmp_path / "adapter")
    batch = train.collate([train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        peft_model = PeftModel.from_pretrained(llama4(), str(out)).eval()
        theirs = peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == 4


def test_discretisation_keeps_the_output_of_the_chosen_modules():
    (train, val), model = data(), lora4(targets=TARGETS)
    sched = schedule(val, keep=16)  # keep everything: the output must not move
    sched.prepare(model)
    with torch.no_grad():
        for a in lorakit.adapters(model).values():
            a.lora_B.weight.normal_()
        sched.gates.normal_()
    batch = train.collate([train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    sched.step_end(2, model, None)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, before, atol=1e-6)


def test_kill_and_resume_gives_the_same_adapter(tmp_path):
    train, val = data()
    straight = lora4(targets=TARGETS)
    fit(straight, train, config=RUN, adapter_schedule=schedule(val), output_dir=str(tmp_path / "a"), save_every=2)
    for crash in (2, 5):  # before and after the discretisation at step 3
        broken = lora4(targets=TARGETS)
        with pytest.raises(Crash):
            fit(broken, train, config=RUN, adapter_schedule=schedule(val), output_dir=str(tmp_path / f"b{crash}"),
                save_every=2, callbacks=[crash_at(crash + 1)])
        resumed = lora4(targets=TARGETS)
        fit(resumed, train, config=RUN, adapter_schedule=schedule(val), output_dir=str(tmp_path / f"b{crash}"), save_every=2,
            resume=True)
        a, b = lorakit.AdapterState.from_model(straight), lorakit.AdapterState.from_model(resumed)
        assert a.modules() == b.modules()
        for path in a.modules():
            for key, t in a.tensors[path].items():
                assert torch.equal(t, b.tensors[path][key]), (crash, path, key)


def test_searches_and_discretises_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lorakit.train.schedules import trainer_callback

    (train, val), model = data(), lora4(targets=TARGETS)
    sched = schedule(val)
    sched.prepare(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=5, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=5e-3)
    Trainer(model=model, args=args, train_dataset=train, data_collator=train.collate,
            callbacks=[trainer_callback(sched)]).train()
    assert sorted(lorakit.adapters(model)) == sched.chosen and len(sched.chosen) == 4
    assert len(set(sched.scores().values())) > 1  # the gates learned in the search steps
    # the kept adapters trained (LoRA B starts at zero)
    assert all(a.lora_B.weight.abs().sum() > 0 for a in lorakit.adapters(model).values())
