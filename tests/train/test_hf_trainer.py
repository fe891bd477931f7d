"""A model with only a few trainable parameters (the shape of an adapted model) trains with transformers.Trainer,
fed by lorakit.data's datasets and collate."""

import pytest
import torch
from conftest import tiny_classifier, tiny_task


def test_transformers_trainer_updates_only_trainable_parameters(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tok = tiny_classifier()
    train = tiny_task().encode(tok, max_length=24)["train"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=train.collate)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def _trainer(name, out, stop_at=None):
    from test_fit_optimizers import lora_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lorakit.data import byte_tokenizer
    from lorakit.optim import create

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == stop_at

    model = lora_model()
    train = tiny_task(n=32).encode(byte_tokenizer(), max_length=16)["train"]
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=6, learning_rate=5e-3,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True,
                             seed=3, data_seed=3)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=train.collate,
                      optimizers=(create(name, model, lr=5e-3), None), callbacks=[Stop()])
    return model, trainer


@pytest.mark.parametrize("name", ["lora_pro", "allora", "lora_plus", "lora_fa"])
def test_each_optimizer_trains_in_transformers_trainer_and_resumes_exactly(name, tmp_path):
    import lorakit

    straight, trainer = _trainer(name, tmp_path / "a")
    trainer.train()
    before = lorakit.AdapterState.from_model(_trainer(name, tmp_path / "x")[0])
    broken, trainer = _trainer(name, tmp_path / "b", stop_at=2)
    trainer.train()
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed, trainer = _trainer(name, tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    a, b = lorakit.AdapterState.from_model(straight), lorakit.AdapterState.from_model(resumed)
    moved = False
    for path in a.modules():
        for key, t in a.tensors[path].items():
            assert torch.equal(t, b.tensors[path][key]), (path, key)
            moved |= not torch.equal(t, before.tensors[path][key])
    assert moved
