"""``lorakit diffuse-gates``: train AutoLoRA fusion gates for several LoRAs on the diffusion testbed, with progress.

A user error is one line and exit status 2; the gates file is written atomically.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``lorakit diffuse-gates``."""
    p = sub.add_parser("diffuse-gates", help="train AutoLoRA fusion gates for several LoRAs on the diffusion testbed")
    p.add_argument("--model", required=True, help="the testbed pipeline directory (runs/diffusion-zoo/model)")
    p.add_argument("--lora", action="append", required=True, metavar="PATH", help="a concept LoRA; repeat")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="gates file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check, load, train with a progress bar, write the gates atomically."""
    import numpy as np
    from tqdm import tqdm

    from .autolora_train import train_gates
    from .cli import load_pipeline
    from .files import load_loras

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.steps < 1 or args.batch < 1:
        raise ValueError(f"--steps {args.steps} and --batch {args.batch}: expected at least 1 each")
    pipe = load_pipeline(args.model)
    names = load_loras(pipe, args.lora)
    gates, losses = train_gates(pipe, names, args.steps, args.batch, args.lr, args.seed,
                                progress=lambda r: tqdm(r, desc="AutoLoRA gates"))
    gates.save(out, overwrite=args.overwrite)
    k = max(1, len(losses) // 10)
    print(f"lorakit diffuse-gates: {out} ({len(names)} LoRAs, {len(gates.layers)} gated modules, loss "
          f"{np.mean(losses[:k]):.4f} -> {np.mean(losses[-k:]):.4f} over {len(losses)} steps)")
    return 0
