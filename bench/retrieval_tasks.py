"""The adapters bench/retrieval.py retrieves: LoRA on MiniLM for tasks carved from the bundled data, cached.

Each task is a bundled task restricted to a few of its labels (``RecordTask``), with a description written here
and a differently worded query (what a user would type), so that retrieval by description is not string
matching. An adapter is trained per (task, seed): its own stratified sample of the training split, its own
initial weights; LoRA r=4 on query and value plus the classification head. Adapters are cached under
``runs/retrieval/adapters/<task>-s<seed>`` and reused when present (delete the folder to retrain).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import lorakit
from lorakit import zoo
from lorakit.generate.tasks import carve
from lorakit.train import evaluate, fit

CACHE = Path("runs/retrieval/adapters")


@dataclass(frozen=True)
class RecordTask:
    """A bundled task restricted to ``labels`` (all labels when empty), with a description and a query."""

    name: str
    source: str
    labels: tuple[str, ...]
    description: str
    query: str


TASKS = (
    RecordTask("tweet-sentiment", "tweets", (), "Sentiment of a tweet: negative, neutral or positive.",
               "is this social media post happy or angry"),
    RecordTask("gloss-pos", "wordnet-pos", (), "Part of speech of a dictionary definition: noun, verb, adjective "
               "or adverb.", "which word class does this definition describe"),
    RecordTask("animal-plant", "wordnet-category", ("noun.animal", "noun.plant"),
               "Does a dictionary gloss define an animal or a plant?", "fauna versus flora"),
    RecordTask("food-artifact", "wordnet-category", ("noun.food", "noun.artifact"),
               "Does a dictionary gloss define a food or a man-made object?", "edible things versus tools and devices"),
    RecordTask("person-location", "wordnet-category", ("noun.person", "noun.location"),
               "Does a dictionary gloss define a kind of person or a place?", "people versus places"),
    RecordTask("feeling-body", "wordnet-category", ("noun.feeling", "noun.body"),
               "Does a dictionary gloss define an emotion or a body part?", "emotions versus anatomy"),
    RecordTask("fortune-computers-love", "fortunes", ("computers", "love"),
               "Is a fortune-cookie saying about computers or about love?", "quotes on programming versus romance"),
    RecordTask("fortune-politics-science", "fortunes", ("politics", "science"),
               "Is a fortune-cookie saying about politics or about science?", "quotes on government versus physics"),
    RecordTask("fortune-food-sports", "fortunes", ("food", "sports"),
               "Is a fortune-cookie saying about food or about sports?", "quotes on eating versus games"),
    RecordTask("time-quantity", "wordnet-category", ("noun.time", "noun.quantity"),
               "Does a dictionary gloss define a period of time or a unit of measure?", "durations versus amounts"),
)
QUICK = TASKS[:6]


def train_adapter(spec: RecordTask, seed: int, steps: int, out: Path) -> dict:
    """Train one adapter (cached in ``out``); returns its test metrics."""
    info = out / "train.json"
    if info.is_file() and (out / "adapter" / "adapter_config.json").is_file():
        return json.loads(info.read_text())
    task = carve(spec.source, spec.labels).subsampled(16 * steps, 200, seed=seed)
    model, tokenizer = zoo.load("minilm", task="seq_cls", num_labels=task.num_labels, seed=seed)
    splits = task.encode(tokenizer, 48)
    lorakit.core.fingerprint.remember(model)
    torch.manual_seed(seed)
    lorakit.apply(model, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            task_type="SEQ_CLS", base_model_name_or_path="minilm"))
    fit(model, splits["train"], lr=2e-3, batch_size=16, max_steps=steps, seed=seed, progress=False)
    metrics = evaluate(model, splits["test"], batch_size=64)
    lorakit.save_peft(model, out / "adapter")
    result = {"task": spec.name, "seed": seed, "steps": steps, "test_accuracy": round(metrics["accuracy"], 4)}
    info.write_text(json.dumps(result) + "\n")
    return result


def build(tasks=TASKS, seeds=(0, 1, 2), steps: int = 40, cache: Path = CACHE) -> list[dict]:
    """Train (or reuse) every (task, seed) adapter; returns one row per adapter with its directory."""
    rows = []
    for spec in tasks:
        for seed in seeds:
            out = cache / f"{spec.name}-s{seed}"
            row = train_adapter(spec, seed, steps, out)
            rows.append({**row, "dir": str(out / "adapter"), "spec": spec})
            print(f"  {spec.name} seed {seed}: test accuracy {row['test_accuracy']:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    build(QUICK)
