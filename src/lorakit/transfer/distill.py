"""Soft labels from the teacher (source base + source adapter) and distillation of the target adapter into them
(Trans-LoRA's steps 4-5).

Loss: T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)), mean over examples (Hinton et al.'s scaling, so
the gradient size does not depend on T). Deviation from the paper: it trains the target LoRA with the language
modelling loss on the teacher's generated completions (hard targets, generative tasks); for classifiers the full
distribution is available and matching it is the closer imitation of the teacher.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.encode import collate, pad_id
from ..train.evaluate import batches


class SoftLabelled(torch.utils.data.Dataset):
    """Tokenised inputs with the teacher's class probabilities (`teacher_probs`)."""

    def __init__(self, texts: Sequence[str], probs: torch.Tensor, tokenizer, max_length: int = 64):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.features = [{"input_ids": i, "attention_mask": m, "teacher_probs": p}
                         for i, m, p in zip(enc["input_ids"], enc["attention_mask"], probs)]
        self.pad_token_id = pad_id(tokenizer)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]

    def collate(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Padded inputs plus the stacked teacher probabilities."""
        out = collate([{k: f[k] for k in ("input_ids", "attention_mask")} for f in batch], self.pad_token_id)
        out["teacher_probs"] = torch.stack([f["teacher_probs"] for f in batch])
        return out


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over unmasked tokens of (batch, tokens, width) hidden states, L2-normalised."""
    mask = mask.unsqueeze(-1).float()
    return F.normalize((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def teacher_outputs(model, tokenizer, texts: Sequence[str], max_length: int = 64, batch_size: int = 64,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities at `temperature`, mean-pooled L2-normalised last hidden states) of `model` on `texts`."""
    was_training = model.training
    model.eval()
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
    probs, feats = [], []
    try:
        for batch in batches(rows, range(len(rows)), batch_size, lambda b: collate(b, pad_id(tokenizer))):
            out = model(**batch, output_hidden_states=True)
            probs.append(F.softmax(out.logits.float() / temperature, dim=-1))
            feats.append(pooled(out.hidden_states[-1], batch["attention_mask"]))
    finally:
        model.train(was_training)
    return torch.cat(probs), torch.cat(feats)


def kd_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student at temperature T), mean over the batch."""
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


@torch.no_grad()
def kl_to_teacher(model, data: SoftLabelled, batch_size: int = 64, temperature: float = 1.0) -> float:
    """Mean KL(teacher || model) over `data` at `temperature`."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for batch in batches(data, range(len(data)), batch_size, data.collate):
            probs = batch.pop("teacher_probs")
            total += kd_loss(model(**batch).logits, probs, temperature).item() * len(probs)
    finally:
        model.train(was_training)
    return total / len(data)


def distill(model, data: SoftLabelled, *, temperature: float = 1.0, **train_options):
    """Train the trainable parameters of `model` (its adapter and head) to match the soft labels of `data`."""
    from ..train import fit

    def loss_fn(m, batch):
        probs = batch.pop("teacher_probs")
        return kd_loss(m(**batch).logits, probs, temperature)

    return fit(model, data, None, loss_fn=loss_fn, collate_fn=data.collate, **train_options)
