"""``lorakit transfer``: move a classification or causal-LM adapter to another base model with Trans-LoRA (synthetic
data only).

The output directory is an ordinary PEFT adapter for the target model, plus ``trans_lora.json`` (what was done:
the generator used, how many inputs were proposed, kept and distilled on, the KL to the teacher (classifiers) or the
LM loss on the teacher's completions (causal LMs) before and after).
Everything the user gives is checked before a model loads; the directory appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import count

BACKGROUND_MAX = 5000


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``transfer`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("transfer", help="move an adapter to another base model with synthetic data (Trans-LoRA)",
                       description="Move an adapter to another base model with Trans-LoRA.")
    p.add_argument("--source-model", required=True, help="base model of the adapter: zoo name or HF model directory")
    p.add_argument("--adapter", required=True, help="the source adapter's PEFT directory (classification or causal LM)")
    p.add_argument("--target-model", required=True, help="the base model to move it to: zoo name or HF directory")
    p.add_argument("--task", required=True, help="bundled task name or local data; only --seeds examples and the label names are used")
    p.add_argument("--seeds", type=count, default=5, help="real examples drawn from the task's training split")
    p.add_argument("--target-method", default="lora", help="registered method of the new adapter (lora, dora, ...)")
    p.add_argument("--generator", choices=["ngram", "lm"], default="ngram",
                   help="ngram: word trigram over the seeds (+ --background); lm: a causal LM continues a few-shot prompt")
    p.add_argument("--generator-model", default="gemma-270m", help="--generator lm: zoo name or HF model directory")
    p.add_argument("--background", default="",
                   help="--generator ngram: comma-separated bundled task names (their training inputs, labels unread) "
                        "or text files (one input per line) mixed into the n-gram counts (default: none)")
    p.add_argument("--candidates", type=count, default=2000, help="inputs proposed before the filter")
    p.add_argument("--num-synthetic", type=count, default=500, help="at most this many kept inputs are distilled on")
    p.add_argument("--min-synthetic", type=count, default=32, help="fail when the filter keeps fewer")
    p.add_argument("--no-filter", action="store_true", help="keep every proposal (skip the discriminator)")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="the discriminator passes this most real-like share")
    p.add_argument("--threshold", type=float, default=None,
                   help="pass instead every input the discriminator judges real with P >= this (the paper: 0.5)")
    p.add_argument("-r", "--rank", type=count, default=None, help="target rank (default: the source adapter's)")
    p.add_argument("--alpha", type=float, default=None, help="target lora_alpha (default: the source adapter's)")
    p.add_argument("--targets", default=None, help="comma-separated target modules (default: the source adapter's)")
    p.add_argument("--epochs", type=count, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--max-length", type=count, default=64, help="tokens per input")
    p.add_argument("--seed", type=int, default=0, help="seed of the seed draw, the generator and the new adapter")
    p.add_argument("--source-seed", type=int, default=0,
                   help="seed that drew the source base's random weights (tiny zoo models), as given to lorakit train")
    p.add_argument("--target-seed", type=int, default=0, help="seed of the target base's random weights and new head")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o")
    p.add_argument("-o", "--out", required=True, help="output PEFT directory for the target model")
    p.set_defaults(func=run)
    return p


def _texts(spec: str, task_name: str) -> tuple[list[str], str]:
    """Background texts from bundled task names or text files, and a description that says which are in-domain."""
    from ..data import load_task
    from ..data.bundled import BUNDLED

    texts, names = [], []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item in BUNDLED:
            texts += [e["text"] for e in load_task(item, max_train=BACKGROUND_MAX).train]
            names.append(f"{item} inputs" + (", in-domain" if item == task_name else ""))
        elif Path(item).is_file():
            texts += [ln.strip() for ln in Path(item).read_text(errors="replace").splitlines() if ln.strip()]
            names.append(item)
        else:
            raise FileNotFoundError(f"--background {item}: neither a bundled task ({', '.join(BUNDLED)}) nor a file")
    return texts, ", ".join(names)


def _head_classes(adapter: Path) -> int | None:
    """Outputs of the classification head the adapter saves in full, or None when it saves none."""
    from ..formats.peft import load_state

    state = load_state(adapter)
    heads = [t["weight"] for path, t in state.modules_to_save.items() if t.get("weight") is not None
             and t["weight"].dim() == 2 and path.split(".")[-1] in ("classifier", "score", "out_proj")]
    return int(heads[-1].shape[0]) if heads else None


def run(args: argparse.Namespace) -> int:
    """Check everything, load the models, transfer, write the PEFT directory and its record."""
    from .. import jobs, load_peft, save_peft, zoo
    from ..core.outputs import check_output, staged
    from ..data import load_task
    from ..formats.peft import read_config
    from .generators import LMGenerator, NGramGenerator
    from .trans_lora import TransLoRAConfig, trans_lora

    from .. import METHODS

    if not 0.0 < args.keep_fraction <= 1.0:
        raise ValueError(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a probability in [0, 1], got {args.threshold}")
    if args.target_method not in METHODS.names():
        raise ValueError(f"--target-method {args.target_method}: not a registered method ({', '.join(METHODS.names())})")
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there; give a PEFT adapter directory")
    out = check_output(args.out, inputs=[adapter], overwrite=args.overwrite)
    source = read_config(adapter)
    if source.task_type not in ("SEQ_CLS", "CAUSAL_LM"):
        raise NotImplementedError(f"--adapter {adapter}: task_type {source.task_type!r}; lorakit transfer moves "
                                  "classification (SEQ_CLS) and causal-LM (CAUSAL_LM) adapters")
    jobs._quiet_transformers()
    causal = source.task_type == "CAUSAL_LM"
    task = load_task(args.task, kind="causal_lm" if causal else "classification")
    classes = None if causal else _head_classes(adapter)
    if classes is not None and classes != task.num_labels:
        raise ValueError(f"--adapter {adapter}: its classification head has {classes} outputs, but --task "
                         f"{args.task} has {task.num_labels} labels ({', '.join(task.label_names)}); give the task "
                         "the adapter was trained for")
    if args.generator == "ngram":
        background, name = _texts(args.background, args.task)
        generator = NGramGenerator(background, name=name)
    else:
        lm, lm_tok = zoo.load(args.generator_model, task="causal_lm", seed=args.seed)
        generator = LMGenerator(lm, lm_tok, name=args.generator_model)
    seeds = [e["prompt" if causal else "text"] for e in task.subsampled(args.seeds, None, seed=args.seed).train]
    kind = {"task": "causal_lm"} if causal else {"num_labels": task.num_labels}
    print(f"lorakit transfer: {args.seeds} seed examples of {args.task}; loading {args.source_model} + {adapter} "
          f"and {args.target_model}", flush=True)
    teacher, teacher_tok = zoo.load(args.source_model, seed=args.source_seed, **kind)
    load_peft(teacher, adapter)
    student, student_tok = zoo.load(args.target_model, seed=args.target_seed, **kind)
    config = TransLoRAConfig(
        num_synthetic=args.num_synthetic, candidates=args.candidates, min_synthetic=args.min_synthetic,
        target_method=args.target_method, r=args.rank, lora_alpha=args.alpha, filter=not args.no_filter,
        target_modules=jobs._targets(args.targets) if args.targets else None, threshold=args.threshold,
        keep_fraction=args.keep_fraction,
        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    record = trans_lora(teacher, teacher_tok, student, student_tok, seeds, generator, config,
                        log=lambda message: print(f"lorakit transfer: {message}", flush=True))
    record.update(source_model=args.source_model, source_adapter=str(adapter), target_model=args.target_model,
                  task=args.task)
    with staged(out) as tmp:
        save_peft(student, tmp)
        (tmp / "trans_lora.json").write_text(json.dumps(record, indent=2) + "\n")
    fit = ("KL to the teacher", "kl") if not causal else ("LM loss on the teacher's completions", "lm_loss")
    print(f"lorakit transfer: wrote {out} ({fit[0]} {record[fit[1] + '_before']:.4f} -> {record[fit[1] + '_after']:.4f}"
          f" on {record['distilled_on']} inputs; generator: {record['generator']})")
    return 0
