"""The compression commands: ``lorakit prune`` (LoRAPrune) and the ``--quantize`` / ``--method loram`` parts of
``lorakit train``. Every argument is checked, and the quantisation probed, before a model loads or a file is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from .quantize import KINDS


def add_train_arguments(p: argparse.ArgumentParser, plain_train) -> None:
    """``--quantize`` and the LoRAM options on ``lorakit train``; ``plain_train(args)`` runs the usual job."""
    p.add_argument("--quantize", choices=KINDS, default=None,
                   help="train over a quantised base (QLoRA): nf4, fp4, int8 (bitsandbytes), torchao-int8, torchao-int4; "
                        "with --bf16, QLoRA's set-up: bf16 compute and the rest of the base (embeddings, norms) in bf16")
    p.add_argument("--loram-ratio", type=float, default=0.5,
                   help="--method loram: fraction of head groups and FFN channels pruned in the training copy")
    p.add_argument("--loram-criterion", choices=["magnitude", "random"], default="magnitude")
    p.set_defaults(func=lambda args: train(args, plain_train))


def train(args: argparse.Namespace, plain_train) -> int:
    """Route ``lorakit train``: LoRAM, a quantised base, or the plain job."""
    from .quantize import check_available, quantize_

    if args.method == "loram":
        return train_loram(args)
    if args.quantize is None:
        return plain_train(args)
    config = quantize_config(args)
    check_available(config)  # before loading anything
    from .. import jobs

    def prepare(model):
        print(f"lorakit train: quantising the base's linear layers to {args.quantize}")
        return quantize_(model, config)

    jobs.train_job(args, prepare=prepare)
    return 0


def quantize_config(args: argparse.Namespace):
    """``--quantize KIND``; with ``--bf16`` the paper's set-up: bf16 compute, unquantised weights stored in bf16."""
    import torch

    from .quantize import QuantizeConfig

    if not getattr(args, "bf16", False) or args.quantize.startswith("torchao"):
        return QuantizeConfig(args.quantize)
    return QuantizeConfig(args.quantize, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)


def train_loram(args: argparse.Namespace) -> int:
    """``lorakit train --method loram``: train on a pruned copy, recover for the full base, evaluate there."""
    from .. import apply, jobs
    from ..train import evaluate, fit
    from .loram import LoRAMConfig, load_recovered, prune_for_training, save_recovered
    from .quantize import QuantizeConfig, check_available

    config = LoRAMConfig(ratio=args.loram_ratio, criterion=args.loram_criterion, quantize=args.quantize)
    if args.quantize:
        check_available(QuantizeConfig(args.quantize))
    model, tokenizer, task = jobs.load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    print(f"lorakit train: pruning a training copy of {args.model} ({config.ratio:.0%} of head groups and FFN channels, "
          f"{config.criterion}{', ' + args.quantize if args.quantize else ''})")
    small, recovery = prune_for_training(model, config, inplace=True)  # the full base is not resident while training
    del model
    apply(small, jobs.method_config("lora", args.rank, args.alpha, args.dropout, jobs._targets(args.targets), args.kind))
    splits = task.encode(tokenizer, args.max_length)
    out = Path(args.out)
    result = fit(small, splits["train"], splits["validation"], lr=args.lr, batch_size=args.batch_size,
                 epochs=max(1, int(args.epochs)), max_steps=args.max_steps, eval_every=args.eval_every,
                 output_dir=str(out), seed=args.seed)
    adapter = save_recovered(small, recovery, out / "adapter")
    print(f"lorakit train: adapter recovered for the full base in {adapter}; testing it on the full base")
    del small
    model = jobs.load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)[0]
    load_recovered(model, adapter)
    test = evaluate(model, splits["test"], batch_size=64)
    summary = {"adapter": str(adapter), "method": "loram", "full_base_fingerprint": recovery.full_fingerprint,
               "test_on_full_base": test, "trainable_parameters": result.trainable_params, "steps": result.steps,
               "wall_time_s": round(result.wall_time, 1)}
    jobs._write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def add_prune_parser(sub, common) -> None:
    """``lorakit prune``: LoRAPrune fine-tuning, then the pruned model with the adapter merged, as an HF directory."""
    p = sub.add_parser("prune", help="structured pruning guided by LoRA (LoRAPrune); writes a smaller HF model")
    common(p)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of head groups and FFN channels removed, in (0, 1)")
    p.add_argument("--metric", choices=["lora", "grad", "magnitude"], default="lora",
                   help="lora: the paper's LoRA-gradient estimate; grad: true weight gradient; magnitude: |W|")
    p.add_argument("--prune-freq", type=int, default=10)
    p.add_argument("-r", "--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default="all-linear", help="LoRA targets (the pruned layers need LoRA for --metric lora)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("-o", "--out", default="runs/prune", help="output directory (pruned model in OUT/model)")
    p.set_defaults(func=prune)


def prune(args: argparse.Namespace) -> int:
    """Run LoRAPrune and save the pruned, merged model."""
    from .. import apply, jobs
    from ..train import evaluate, fit
    from .loraprune import LoRAPrune, LoRAPruneConfig

    config = LoRAPruneConfig(ratio=args.ratio, metric=args.metric, prune_freq=args.prune_freq)
    out = Path(args.out)
    if (out / "model").exists():
        raise FileExistsError(f"{out / 'model'} exists; choose another --out or remove it")
    model, tokenizer, task = jobs.load(args.model, args.task, args.kind, args.max_train, args.max_eval, args.seed)
    targets = args.targets if args.targets == "all-linear" else jobs._targets(args.targets)
    apply(model, jobs.method_config("lora", args.rank, args.alpha, 0.0, targets, args.kind))
    pruner = LoRAPrune(model, config, total_steps=args.max_steps)
    splits = task.encode(tokenizer, args.max_length)
    fit(model, splits["train"], splits["validation"], lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
        callbacks=[pruner, progress(pruner)], seed=args.seed, eval_every=max(1, args.max_steps // 4))
    sparsity = pruner.sparsity()
    small = pruner.finalize()
    target = save_model(small, tokenizer, out / "model")
    test = evaluate(small, splits["test"], batch_size=64)
    summary = {"model": str(target), "sparsity": sparsity, "metric": args.metric,
               "parameters": sum(p.numel() for p in small.parameters()), "test": test,
               "size_on_disk_bytes": sum(f.stat().st_size for f in target.iterdir() if f.is_file())}
    jobs._write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def progress(pruner):
    """A callback that prints the masked fractions whenever a pruning step changes them."""
    last: dict = {}

    def report(step: int, record=None) -> None:
        now = pruner.sparsity()
        if now != last:
            last.update(now)
            print(f"lorakit prune: step {step}: {now['groups']:.0%} of head groups and {now['channels']:.0%} of FFN "
                  "channels masked", flush=True)

    return report


def save_model(model, tokenizer, path: Path) -> Path:
    """``save_pretrained`` into a temporary folder beside ``path``, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lorakit-model-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
