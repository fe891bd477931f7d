"""A model with only a few trainable parameters (the shape of an adapted model) trains with transformers.Trainer,
fed by lorakit.data's datasets and collate."""

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
