"""``lorakit generate sg-lora|icm-lora``: an adapter for a new task from a zoo, written as a PEFT directory.

    lorakit generate sg-lora --zoo runs/zoo/minilm --description "Is this definition about a fish or a bird?" -o out
    lorakit generate icm-lora --zoo runs/zoo/minilm --examples task.jsonl -o out

The generator is fitted on the zoo's expert adapters at each call (seconds), then generates; nothing trains on the
new task. ``--examples`` (ICM-LoRA) is a JSONL / CSV file with ``text`` and ``label`` columns; its first ``--shots``
examples, classes in turn, give the task vector.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    """Add ``generate`` with its two generators."""
    from ..cli import count

    p = subparsers.add_parser("generate", help="generate an adapter for a new task from a task zoo (SG-LoRA, ICM-LoRA)")
    sub = p.add_subparsers(dest="generator", required=True, metavar="GENERATOR")
    for name, help_text in (("sg-lora", "from the task's description alone"),
                            ("icm-lora", "from a few labelled examples (task vector)")):
        g = sub.add_parser(name, help=help_text, formatter_class=p.formatter_class)
        g.add_argument("--zoo", default="runs/zoo/minilm", help="zoo root (holds index.json; `make zoo` builds it)")
        g.add_argument("-o", "--out", required=True, help="output PEFT directory")
        g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        g.add_argument("--model", default=None, help="base model (default: the zoo's); another base is refused")
        g.add_argument("--num-labels", type=count, default=2, help="classes of the head the adapter is recorded for")
        g.add_argument("--sample", action="store_true", help="sample the latent instead of taking the prior's mean")
        g.add_argument("--seed", type=int, default=0, help="seed of the generator's training and of --sample")
        if name == "sg-lora":
            g.add_argument("--description", required=True, help="one sentence saying what the task is")
            g.add_argument("--top-k", type=count, default=3, help="experts weighted by description similarity")
            g.add_argument("--temperature", type=float, default=0.05, help="softmax temperature over cosine similarity")
        else:
            g.add_argument("--examples", required=True, help="JSONL / CSV file with text and label columns")
            g.add_argument("--shots", type=count, default=16, help="examples that make the task vector")
        g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import zoo as models
    from ..data import from_records, read_splits
    from .icm_lora import ICMLoRA, demonstrations
    from .params import write_adapter
    from .sg_lora import SGLoRA
    from .zooindex import Zoo

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if args.generator == "sg-lora" and not args.description.strip():
        raise ValueError("--description is empty; SG-LoRA generates from a sentence saying what the task is")
    zoo = Zoo.open(args.zoo)
    causal = zoo.index.get("kind") == "causal_lm"
    base = args.model or zoo.index["base"]
    model, tokenizer = (models.load(base, task="causal_lm") if causal else models.load(base, num_labels=args.num_labels))
    zoo.check_base(model)
    if args.generator == "sg-lora":
        generator = SGLoRA(top_k=args.top_k, temperature=args.temperature, seed=args.seed).fit(zoo)
        state = generator.generate(args.description, sample=args.sample, seed=args.seed)
        info = {"weights": generator.weights(args.description)}
    else:
        task = from_records(read_splits(args.examples), validation_fraction=0.0, test_fraction=0.0,
                            source=str(args.examples))
        demos = demonstrations(task.train + task.validation + task.test, task.label_names, args.shots)
        generator = ICMLoRA(seed=args.seed, causal=causal).fit(zoo, model, tokenizer,
                                                               {e["name"]: e["demos"] for e in zoo.entries("expert")})
        state = generator.generate(generator.task_vector(model, tokenizer, demos), sample=args.sample, seed=args.seed)
        info = {"shots": len(demos)}
    path = write_adapter(state, out, model)
    print(json.dumps({"adapter": str(path), "generator": generator.name, "generator_bytes": generator.nbytes(),
                      "fit_seconds": round(generator.fit_seconds, 2), **info}, indent=1))
    return 0
