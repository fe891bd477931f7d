"""Tiny models and data shared by the training tests."""

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lorakit import zoo  # noqa: E402
from lorakit.data import Task, byte_tokenizer  # noqa: E402



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy 2-core machine ran
    10-20x slower than one; restore the setting afterwards for other test folders."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "okay", "meh", "so-so"]


def tiny_task(n: int = 48, seed: int = 0) -> Task:
    """Three-class 'sentiment' of word lists; the class is the group of the first word (learnable)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 5))
        examples.append({"text": " ".join(words), "label": WORDS.index(words[0]) // 3})
    return Task("classification", examples[: n * 3 // 4], examples[n * 3 // 4 :], [], ("pos", "neg", "neutral"))


def adapter_like(model, trainable=("score", "layers.1.self_attn.q_proj")):
    """Freeze everything, then unfreeze the named parts: the shape of an adapted model, without an adapter."""
    for name, param in model.named_parameters():
        param.requires_grad = any(part in name for part in trainable)
    return model


def tiny_classifier(seed: int = 0):
    """tiny-llama with a 3-way head, only the head and one projection trainable."""
    model, tok = zoo.load("tiny-llama", "seq_cls", num_labels=3, seed=seed)
    return adapter_like(model), tok


@pytest.fixture
def cls_data():
    """(train, validation) EncodedDatasets of the tiny task."""
    encoded = tiny_task().encode(byte_tokenizer(), max_length=24)
    return encoded["train"], encoded["validation"]
