"""Build the task zoo: one LoRA per zoo task on MiniLM (and a few on the tiny Llama), cached under runs/zoo/.

    python -m lorakit.generate.taskzoo [--out runs/zoo] [--base minilm] [--causal]   (what `make zoo` runs)

Every adapter is trained by ``lorakit.train.fit`` with the same settings (``ZooBudget``) and seeds: the head starts
from the task's linear probe (LP-FT), and the LoRA factors of every task start from the same draw (``INIT_SEED``),
so that the adapters share one coordinate system; averaging or generating raw A/B factors is only meaningful then.
Snapshots of the adapter are kept at a few steps of each run (ICM-LoRA trains on several checkpoints per task).
A task whose ``metrics.json`` exists is not trained again, so an interrupted build resumes; the index is written
last, atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import zoo as models
from ..core.apply import apply
from ..core.config import LoRAConfig
from ..core.state import AdapterState
from ..formats.peft import save_peft, save_state
from ..core import fingerprint
from ..train import evaluate, fit
from .icm_lora import demonstrations
from .features import accuracy, fit_probe, pooled
from .tasks import CAUSAL_TASKS, TASKS, as_causal, by_name
from .zooindex import INDEX, backbone_fingerprint, write_json

INIT_SEED = 1234  # every zoo LoRA starts from this draw of A (B = 0)
DEMOS = 16  # labelled training examples kept in the index per task (ICM-LoRA's task vectors)


@dataclass(frozen=True)
class ZooBudget:
    """What every zoo adapter is trained with."""

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    steps: int = 36
    batch_size: int = 16
    lr: float = 3e-3
    max_train: int = 288
    max_eval: int = 200
    max_length: int = 24
    snapshots: tuple[int, ...] = (12, 24)  # earlier steps kept besides the final adapter


CAUSAL_BUDGET = ZooBudget(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), steps=80, lr=1e-2, max_length=96,
                          snapshots=(40,))


def head_name(model) -> str:
    """The name of the classification head: the child module with parameters that is not the backbone."""
    for name, child in model.named_children():
        if child is not model.base_model and any(True for _ in child.parameters()):
            return name
    raise ValueError(f"{type(model).__name__}: no classification head beside its backbone")


def init_lora(model, config: LoRAConfig):
    """Apply ``config`` with the zoo's shared initial draw of the LoRA factors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return apply(model, config)


def _snapshotter(model, steps: tuple[int, ...], into: dict):
    def callback(step: int, _record: dict) -> None:
        if step in steps:
            into[step] = AdapterState.from_model(model)
    return callback


def train_task(spec, base: str, budget: ZooBudget, out: Path, causal: bool = False) -> dict:
    """Train one zoo adapter into ``out`` (adapter/, snapshots/) and return its index entry."""
    task = spec.load(budget.max_train, budget.max_eval)
    labels = list(task.label_names)
    demos = demonstrations(task.train, labels, DEMOS)
    metrics = {}
    if causal:
        task = as_causal(task)
        model, tokenizer = models.load(base, task="causal_lm")
    else:
        model, tokenizer = models.load(base, num_labels=task.num_labels, seed=0)
    data = task.encode(tokenizer, budget.max_length)
    config = LoRAConfig(r=budget.rank, lora_alpha=budget.alpha, target_modules=list(budget.targets))
    if causal:
        metrics["base_loss"] = evaluate(model, data["test"])["loss"]
    else:  # LP-FT: the head starts from the linear probe on the frozen features
        pad = data["train"].pad_token_id
        x, y = pooled(model, data["train"].features, pad), torch.tensor([f["labels"] for f in data["train"]])
        head = fit_probe(x, y, task.num_labels)
        x_test = pooled(model, data["test"].features, pad)
        metrics["probe_accuracy"] = accuracy(head, x_test, torch.tensor([f["labels"] for f in data["test"]]))
        layer = getattr(model, head_name(model))
        with torch.no_grad():
            layer.weight.copy_(head.weight)
            layer.bias.copy_(head.bias)
        config = dataclasses.replace(config, modules_to_save=[head_name(model)])
    init_lora(model, config)
    snaps: dict[int, AdapterState] = {}
    start = time.perf_counter()
    fit(model, data["train"], max_steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, seed=0,
        progress=False, callbacks=[_snapshotter(model, budget.snapshots, snaps)])
    metrics["train_seconds"] = round(time.perf_counter() - start, 2)
    metrics.update({f"test_{k}": v for k, v in evaluate(model, data["test"]).items()})
    save_peft(model, out / "adapter")
    record = fingerprint.record(model)
    for step, state in sorted(snaps.items()):
        save_state(state, out / "snapshots" / f"step-{step}", base=record)
    entry = {"name": spec.name, "description": spec.description, "split": spec.split, "source": spec.source,
             "labels": labels, "path": f"{spec.name}/adapter",
             "snapshots": [f"{spec.name}/snapshots/step-{s}" for s in sorted(snaps)],
             "sizes": {s: len(data[s]) for s in ("train", "test")}, "metrics": metrics,
             "demos": demos,
             "budget": dataclasses.asdict(budget)}
    write_json(out / "metrics.json", entry)
    return entry


def build_zoo(root, base: str = "minilm", tasks=TASKS, budget: ZooBudget = ZooBudget(), causal: bool = False,
              progress: bool = True) -> Path:
    """Train every task's adapter that is not cached yet under ``root`` and write ``root/index.json``."""
    from tqdm import tqdm

    root = Path(root)
    entries = []
    for spec in tqdm(tasks, desc=f"zoo {base}", disable=not progress, file=sys.stderr):
        cached = root / spec.name / "metrics.json"
        entry = json.loads(cached.read_text()) if cached.is_file() else None
        if entry is None or entry.get("budget") != json.loads(json.dumps(dataclasses.asdict(budget))):
            entry = train_task(spec, base, budget, root / spec.name, causal)
        entries.append(entry)
    model, _ = models.load(base, task="causal_lm") if causal else models.load(base, num_labels=2)
    write_json(root / INDEX, {"base": base, "kind": "causal_lm" if causal else "seq_cls",
                              "fingerprint": backbone_fingerprint(model), "budget": dataclasses.asdict(budget),
                              "init_seed": INIT_SEED, "tasks": entries})
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorakit.generate.taskzoo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/zoo", help="zoo root; the MiniLM zoo goes to OUT/minilm")
    p.add_argument("--base", default="minilm")
    p.add_argument("--causal", default="tiny-llama", help="causal LM of the small causal zoo ('' to skip)")
    args = p.parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    print(build_zoo(Path(args.out) / args.base, args.base))
    if args.causal:
        print(build_zoo(Path(args.out) / args.causal, args.causal, [by_name(n) for n in CAUSAL_TASKS],
                        CAUSAL_BUDGET, causal=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
