"""The four MiniLM tasks of bench/merge.py and what runs on them: training, pooled features, per-task heads.

Every model is all-MiniLM-L6-v2 as ``BertForSequenceClassification``: logits = classifier(pooler(encoder(x))).
The pooler is the checkpoint's and stays frozen, so a task's head is its ``classifier`` alone and any encoder
(base, a task LoRA, a merged LoRA, a routed adapter) can be read through any task's head: features are the
pooler output, and ``accuracy(head, features)`` scores them. A multi-task model is the same encoder with one
head per task (``MultiHead``); a batch carries the task of each example under ``task`` (and ``route_labels``
for MeteoRA's supervised gate, which ``lorakit.methods.routing.loss_fn`` takes out).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import zoo
from lorakit.data import collate, load_task, subsample
from lorakit.generate.features import fit_probe
from lorakit.methods import routing
from lorakit.train import fit

TASK_NAMES = ("tweets", "fortunes", "wordnet-category", "wordnet-pos")
TARGETS = ["query", "key", "value"]


@dataclass
class Split:
    """One split of every task, concatenated: features (with ``task``) and where each task's examples lie."""

    features: list
    slices: dict  # task name -> slice into features

    def labels(self, name: str) -> torch.Tensor:
        return torch.tensor([f["labels"] for f in self.features[self.slices[name]]])


def quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tasks(max_train: int, max_val: int, max_eval: int, max_length: int):
    """(tasks {name: {"num_labels", "label_names", "train" EncodedDataset}}, val Split, test Split, pad id).

    Subsets are drawn with seed 0 (stratified by label), so every seed sees the same examples."""
    quiet()
    _, tokenizer = zoo.load("minilm", task="seq_cls", num_labels=2)
    tasks, val, test = {}, Split([], {}), Split([], {})
    for t, name in enumerate(TASK_NAMES):
        task = load_task(name)
        small = task.subsampled(max_train, max_eval, seed=0)
        small = type(small)(small.kind, small.train, subsample(task.validation, max_val, 0, "label"), small.test,
                            small.label_names, small.source)
        enc = small.encode(tokenizer, max_length)
        tasks[name] = {"index": t, "num_labels": task.num_labels, "label_names": list(task.label_names),
                       "train": enc["train"], "sizes": {s: len(enc[s]) for s in ("train", "validation", "test")}}
        for split, key in ((val, "validation"), (test, "test")):
            start = len(split.features)
            split.features += [{**f, "task": t} for f in enc[key]]
            split.slices[name] = slice(start, len(split.features))
    return tasks, val, test, enc["train"].pad_token_id


def multitask_collate(pad_id: int):
    """Collate examples carrying ``task``: padded batch plus ``task`` and ``route_labels`` (both the task id)."""

    def fn(batch):
        out = collate([{k: v for k, v in f.items() if k != "task"} for f in batch], pad_id)
        out["task"] = out["route_labels"] = torch.tensor([f["task"] for f in batch])
        return out

    return fn


def base_model(num_labels: int = 2, seed: int = 0) -> nn.Module:
    """MiniLM with a classification head of ``num_labels`` drawn from ``seed``."""
    return zoo.load("minilm", task="seq_cls", num_labels=num_labels, seed=seed)[0]


def lora_config(rank: int, **fields) -> lorakit.LoRAConfig:
    return lorakit.LoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, **fields)


# -- heads ----------------------------------------------------------------------------------------------
def new_head(dim: int, num_labels: int, seed: int) -> nn.Linear:
    """A head initialised as BERT's classifier (N(0, 0.02), zero bias), drawn from ``seed``."""
    head = nn.Linear(dim, num_labels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    return head


def head_of(state: lorakit.AdapterState) -> nn.Linear:
    """The classifier a task adapter trained (its ``modules_to_save``), as a frozen Linear."""
    t = state.modules_to_save["classifier"]
    head = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(t["weight"])
        head.bias.copy_(t["bias"])
    return head.requires_grad_(False)


def lora_only(state: lorakit.AdapterState) -> lorakit.AdapterState:
    """The state without its head (``modules_to_save``): the part that is merged."""
    return lorakit.AdapterState(dataclasses.replace(state.config, modules_to_save=None), state.tensors)


class MultiHead(nn.Module):
    """A sequence classifier's encoder with one head per task; the loss is each example's own head's CE."""

    def __init__(self, model: nn.Module, heads: list):
        super().__init__()
        self.model, self.heads = model, nn.ModuleList(heads)

    def forward(self, input_ids, attention_mask, labels, task):
        pooled = self.model.dropout(self.model.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        loss = pooled.new_zeros(())
        for t in task.unique().tolist():
            sel = task == t
            loss = loss + F.cross_entropy(self.heads[t](pooled[sel]), labels[sel], reduction="sum")
        return SimpleNamespace(loss=loss / len(labels))


# -- training --------------------------------------------------------------------------------------------
def train_single(task: dict, head: nn.Linear, seed: int, rank: int, steps: int, batch_size: int, lr: float):
    """A task LoRA (q/k/v) and its head (starting from ``head``, the linear probe), trained jointly; returns
    (model, seconds, final loss)."""
    model = base_model(task["num_labels"], seed)
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    lorakit.apply(model, lora_config(rank, modules_to_save=["classifier"]))
    start = time.perf_counter()
    result = fit(model, task["train"], lr=lr, batch_size=batch_size, max_steps=steps, seed=seed, progress=False,
                 log_every=max(1, steps // 10))
    return model, time.perf_counter() - start, _last_loss(result)


def train_multitask(model: MultiHead, tasks: dict, seed: int, steps: int, batch_size: int, lr: float, pad_id: int):
    """Train whatever requires grad in ``model`` on the union of the tasks' training sets; (seconds, loss)."""
    data = [{**f, "task": task["index"]} for task in tasks.values() for f in task["train"]]
    start = time.perf_counter()
    result = fit(model, data, lr=lr, batch_size=batch_size, max_steps=steps, seed=seed, progress=False,
                 log_every=max(1, steps // 10), collate_fn=multitask_collate(pad_id), loss_fn=routing.loss_fn)
    return time.perf_counter() - start, _last_loss(result)


def _last_loss(result) -> float:
    losses = [h["loss"] for h in result.history if "loss" in h]
    return round(losses[-1], 4) if losses else float("nan")


# -- evaluation ------------------------------------------------------------------------------------------
@torch.inference_mode()
def pooled(model: nn.Module, split: Split, pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Pooler outputs [N, hidden] of ``model`` (a sequence classifier) for every example of ``split``.

    Examples are batched by length (less padding) and returned in the split's order."""
    model.eval()
    order = sorted(range(len(split.features)), key=lambda i: len(split.features[i]["input_ids"]))
    out = [None] * len(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{k: split.features[i][k] for k in ("input_ids", "attention_mask")} for i in idx], pad_id)
        for i, row in zip(idx, model.bert(**batch).pooler_output):
            out[i] = row
    return torch.stack(out)


def features_of(base: nn.Module, state, split: Split, pad_id: int) -> torch.Tensor:
    """Pooled features of ``base`` with the LoRA ``state`` loaded (None: the bare encoder); ``base`` is restored."""
    if state is None:
        return pooled(base, split, pad_id)
    state.load_into(base)
    try:
        return pooled(base, split, pad_id)
    finally:
        lorakit.unwrap(base)


@torch.inference_mode()
def probs(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return torch.softmax(head(feats), dim=-1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.argmax(-1) == labels).float().mean().item()


def per_task(heads: dict, feats: torch.Tensor, split: Split) -> dict:
    """Accuracy of each task's head on that task's examples of ``feats``."""
    return {name: accuracy(probs(head, feats[split.slices[name]]), split.labels(name)) for name, head in heads.items()}


def train_probe(feats: torch.Tensor, labels: torch.Tensor, num_labels: int, seed: int, steps: int = 300) -> nn.Linear:
    """A head trained alone on frozen base features (full-batch AdamW, lr 1e-2): the linear probe."""
    return fit_probe(feats, labels, num_labels, seed=seed, steps=steps)
