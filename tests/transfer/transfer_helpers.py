"""Tiny teachers and labelled sentences for the Trans-LoRA tests."""
from __future__ import annotations

import torch

from lorakit import apply, zoo
from lorakit.jobs import method_config

WORDS = {0: ["awful", "bad", "sad", "broken", "late", "rude"], 1: ["okay", "plain", "usual", "fine", "normal", "average"],
         2: ["great", "happy", "lovely", "fast", "kind", "superb"]}


def sentences(n: int, seed: int = 0) -> list[dict]:
    """Short labelled sentences whose class shows in their adjectives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 3
        a, b = (WORDS[label][int(j)] for j in torch.randint(0, 6, (2,), generator=g))
        out.append({"text": f"the flight was {a} and the crew was {b}", "label": label})
    return out


def make_teacher(model: str = "tiny-bert", num_labels: int = 3, seed: int = 0):
    """A base with a LoRA whose B and head are drawn large, so its predictions are confident and input-dependent."""
    teacher, tok = zoo.load(model, num_labels=num_labels, seed=seed)
    torch.manual_seed(seed)
    apply(teacher, method_config("lora", 4, 8, 0.0, ["query", "value"], "classification", base_model=model))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif p.requires_grad and "classifier" in name and name.endswith("weight"):
                p.normal_(0, 3.0)
    return teacher, tok
