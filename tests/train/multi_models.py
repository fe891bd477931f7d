"""Tiny bases, data and solo reference runs shared by the multi-job training tests."""
from __future__ import annotations

import copy
import random

import torch

from lorakit import LoRAConfig, apply, zoo
from lorakit.data import Task, byte_tokenizer
from lorakit.train import TrainConfig, fit
from lorakit.train.multi import Job

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "okay", "meh", "so-so"]


def causal_data(n: int, seed: int):
    """Prompt/completion pairs of different lengths, encoded with the byte tokenizer."""
    rng = random.Random(seed)
    ex = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 4))) + ":", "completion": rng.choice(WORDS)}
          for _ in range(n)]
    return Task("causal_lm", ex, ex[:6], []).encode(byte_tokenizer(), max_length=32)["train"]


def cls_data(n: int, seed: int):
    """Three-class word lists (the class is the group of the first word)."""
    rng = random.Random(seed)
    ex = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 6))
        ex.append({"text": " ".join(words), "label": WORDS.index(words[0]) // 3})
    return Task("classification", ex, ex[:8], [], ("pos", "neg", "neutral")).encode(byte_tokenizer(), max_length=24)["train"]


def base(kind: str = "causal_lm", name: str = "tiny-llama"):
    """A frozen tiny base model."""
    task = "causal_lm" if kind == "causal_lm" else "seq_cls"
    model, _ = zoo.load(name, task, num_labels=3 if task == "seq_cls" else None, seed=0)
    return model


def job(name: str, r: int = 4, lr: float = 5e-3, batch_size: int = 4, steps: int = 4, seed: int = 0, kind="causal_lm",
        n: int = 16, data=None, targets=("q_proj", "v_proj"), **train) -> Job:
    """A job with its own rank, lr, batch size, seed and data."""
    data = data if data is not None else (causal_data if kind == "causal_lm" else cls_data)(n, seed + 100)
    adapter = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                         task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS")
    cfg = TrainConfig(lr=lr, batch_size=batch_size, max_steps=steps, seed=seed, progress=False, log_every=1,
                      warmup_steps=1, **train)
    return Job(name, adapter, data, cfg)


def solo(model, j: Job) -> dict[str, torch.Tensor]:
    """The job trained alone by `fit` on a copy of the base: its trainable tensors by name."""
    alone = copy.deepcopy(model)
    torch.manual_seed(j.config.seed)
    apply(alone, j.adapter)
    fit(alone, j.train_data, config=j.config)
    return {n: p.detach().clone() for n, p in alone.named_parameters() if p.requires_grad}


def trained(trainer_or_run, name: str) -> dict[str, torch.Tensor]:
    """A job's trained tensors by `fit`'s names, from a MultiTrainer."""
    run = trainer_or_run.runs.get(name) or trainer_or_run.closed[name]
    return {n: p.detach().clone() for n, p in run.named.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)
