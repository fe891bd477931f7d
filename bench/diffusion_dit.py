"""What each composition method costs on diffusion transformers: denoiser evaluations and wall time per image.

On the tiny random pipelines of ``lorakit.diffusion.tiny`` (PixArt-alpha: cross-attention DiT, DDIM; Stable
Diffusion 3: joint attention, flow-matching Euler), two random LoRAs, one image per generation, every method on the
same prompt and seed; the wall time is the median over ``--repeats`` generations, methods interleaved. No quality is
measured (the weights are random); the section it adds to docs/benchmarks/diffusion.md says so.

    python bench/diffusion_dit.py --quick     # 4 steps, 1 repeat
    python bench/diffusion_dit.py             # 10 steps, 3 repeats
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, load_average, machine, write_json  # noqa: E402
from diffusion_report import write_report  # noqa: E402

from lorakit.diffusion import compose  # noqa: E402
from lorakit.diffusion.gates import Gates  # noqa: E402
from lorakit.diffusion.tiny import BUILDERS, SIDE, add_random_loras, generate_kwargs  # noqa: E402

OUT = Path("docs/benchmarks")
NAMES = ["cross", "yellow"]
PROMPT = "yellow cross"
METHODS = [("merge", {}), ("switch", {"every": 2}), ("composite", {}), ("cmlora", {}), ("cmlora", {"cache": False}),
           ("clora", {"refine_iters": 0, "prompt": PROMPT}),
           ("lora_composer", {"prompt": PROMPT, "layout": [(0, 0, SIDE // 2, SIDE), (SIDE // 2, 0, SIDE, SIDE)]}),
           ("autolora", {})]  # untrained gates (the merge), which cost what trained ones do


def label(method: str, options: dict) -> str:
    return method + (" (uncached)" if options.get("cache") is False else "")


def measure(kind: str, steps: int, repeats: int) -> dict:
    """{method: evaluations and median wall seconds per image} on the tiny ``kind`` pipeline."""
    pipe = BUILDERS[kind][0]()
    add_random_loras(pipe, kind, NAMES)
    extra = {**generate_kwargs(pipe), **({"clean_caption": False} if kind == "pixart" else {})}
    gates = Gates.for_denoiser(pipe.transformer, NAMES)
    times: dict[str, list[float]] = {label(m, o): [] for m, o in METHODS}
    evaluations = {}
    for _ in range(repeats + 1):  # the first round warms up and is not timed
        for method, options in METHODS:
            opts = {**options, **({"gates": gates} if method == "autolora" else {})}
            start = time.perf_counter()
            with compose(pipe, NAMES, method, **opts) as stats:
                pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0), **extra)
            times[label(method, options)].append(time.perf_counter() - start)
            evaluations[label(method, options)] = stats.evaluations
    return {name: {"evaluations": evaluations[name], "wall_per_image_s": float(np.median(t[1:]))}
            for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 steps, 1 repeat")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    steps, repeats = (4, 1) if args.quick else (10, 3)
    start = time.perf_counter()
    results = {kind: measure(kind, steps, repeats) for kind in sorted(BUILDERS)}
    data = {"command": command_line(argv), "machine": machine(), "load_average": load_average(),
            "wall_s": round(time.perf_counter() - start, 1),
            "settings": {"steps": steps, "repeats": repeats, "loras": len(NAMES), "guidance": 4.0,
                         "pipelines": {"pixart": "PixArtAlphaPipeline, DDIM", "sd3": "StableDiffusion3Pipeline, "
                                       "flow-matching Euler"}}, "results": results}
    write_json(args.out / "diffusion_dit.json", data)
    if (args.out / "diffusion.json").exists():
        write_report(args.out / "diffusion.json", args.out / "diffusion.md")
    for kind, rows in results.items():
        for name, r in rows.items():
            print(f"{kind:6s} {name:22s} {r['evaluations']:4d} evaluations {r['wall_per_image_s'] * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
