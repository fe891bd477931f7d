"""Multi-LoRA composition on the diffusion testbed: concept presence, place, cost, CMLoRA's caching.

For 2, 3 and 4 of the four concept LoRAs (cross, yellow, striped, framed) and prompt-seed pairs spread over every
combination, each method generates the same images (same prompts, same initial noise); the judge reads each image.
Reported per method and concept count: the share of images with every concept present, per-concept presence, the
share with the object on the prompted side (for LoRA-Composer, given boxes on that side, its layout accuracy),
denoiser evaluations and wall time per image. Each LoRA alone on its own concept is the ceiling row. CLoRA runs
without its refinement iterations (``refine_iters=0``: one latent step per step in the first half) to fit the
machine; LoRA-Composer gets the object LoRAs boxed on the prompted half and the others as whole-image
(background) LoRAs. Claims (thresholds fixed in CLAIMS before any run) are checked at the end.

    python bench/diffusion.py --quick      # 48 pairs per concept count, 12 DDIM steps (about 10 minutes here)
    python bench/diffusion.py              # 100 pairs per concept count, 20 steps

AutoLoRA's gates are trained at the start of the run (150 steps quick, 400 full; ``--gates FILE`` reuses a file
instead); ``--methods switch,composite,autolora`` runs a subset (claims on methods left out are skipped).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, load_average, machine, write_json  # noqa: E402

from lorakit.diffusion import compose, load_loras  # noqa: E402
from lorakit.diffusion.judge import Judge, presence  # noqa: E402
from lorakit.diffusion.pipeline import ConceptPipeline  # noqa: E402
from lorakit.diffusion.shapes import CONCEPTS, sample_scene  # noqa: E402

OUT = Path("docs/benchmarks")
METHODS = [("merge", {}), ("switch", {"every": 2}), ("composite", {}), ("cmlora", {}), ("cmlora", {"cache": False}),
           ("clora", {"refine_iters": 0}), ("lora_composer", {}),
           ("autolora", {})]  # autolora's gates are trained (or read) in main and added to its options
OBJECT = ("cross", "yellow")  # concepts of the object: boxed on the prompted side; the others cover the image
# (claim, metric, method, relation, reference, threshold): fixed before the first run
CLAIMS = [
    ("Composite composes better than Merge (3-4 concepts)", "all_present", "composite", ">", "merge", 0.0),
    ("Composite composes better than Switch (3-4 concepts)", "all_present", "composite", ">", "switch", 0.0),
    ("CMLoRA composes better than Switch (3-4 concepts)", "all_present", "cmlora", ">", "switch", 0.0),
    ("CMLoRA composes better than Composite (3-4 concepts)", "all_present", "cmlora", ">", "composite", 0.0),
    ("CMLoRA's cache saves >= 25% of denoiser evaluations (3 concepts)", "evaluations", "cmlora", "<=",
     "cmlora-uncached", 0.75),
    ("CMLoRA's cache keeps composition within 0.10 of uncached (3 concepts)", "all_present", "cmlora", ">=",
     "cmlora-uncached", -0.10),
    ("CLoRA composes better than Switch (3-4 concepts)", "all_present", "clora", ">", "switch", 0.0),
    ("CLoRA composes better than Composite (3-4 concepts)", "all_present", "clora", ">", "composite", 0.0),
    ("CLoRA: higher mean per-concept presence than Switch (3-4 concepts)", "concept_mean", "clora", ">", "switch", 0.0),
    ("CLoRA: higher mean per-concept presence than Composite (3-4 concepts)", "concept_mean", "clora", ">",
     "composite", 0.0),
    ("LoRA-Composer composes better than Switch (3-4 concepts)", "all_present", "lora_composer", ">", "switch", 0.0),
    ("LoRA-Composer composes better than Composite (3-4 concepts)", "all_present", "lora_composer", ">", "composite",
     0.0),
    ("LoRA-Composer: higher mean per-concept presence than Switch (3-4 concepts)", "concept_mean", "lora_composer",
     ">", "switch", 0.0),
    ("LoRA-Composer: higher mean per-concept presence than Composite (3-4 concepts)", "concept_mean",
     "lora_composer", ">", "composite", 0.0),
    ("LoRA-Composer's boxes put the object on its side >= 0.05 more often than Composite (2-4 concepts)", "place",
     "lora_composer", ">=", "composite", 0.05),
    ("AutoLoRA composes better than Switch (2 concepts)", "all_present", "autolora", ">", "switch", 0.0),
    ("AutoLoRA composes better than Composite (2 concepts)", "all_present", "autolora", ">", "composite", 0.0),
    ("AutoLoRA composes better than Switch (3-4 concepts)", "all_present", "autolora", ">", "switch", 0.0),
    ("AutoLoRA composes better than Composite (3-4 concepts)", "all_present", "autolora", ">", "composite", 0.0),
]


def label(method: str, options: dict) -> str:
    return method + ("-uncached" if options.get("cache") is False else "")


def pairs(k: int, n: int, seed: int = 0) -> list[tuple[tuple[str, ...], str, int]]:
    """n (concepts, prompt, seed) triples cycling over every k-subset of the concepts."""
    combos = list(itertools.combinations(CONCEPTS, k))
    rng = np.random.default_rng(seed + k)
    return [(combos[i % len(combos)], sample_scene(rng, combos[i % len(combos)]).prompt, 1000 * k + i)
            for i in range(n)]


def layout(concepts, prompt: str) -> list[tuple[int, int, int, int]]:
    """LoRA-Composer's boxes: object concepts on the prompted half, the others (background LoRAs) the whole image."""
    half = (0, 0, 16, 32) if "left" in prompt.split() else (16, 0, 32, 32)
    return [half if c in OBJECT else (0, 0, 32, 32) for c in concepts]


def generate(pipe, concepts, prompts, seeds, method, options, steps):
    """Images (N, 3, 32, 32) for one concept set, the composition's stats (evaluations per generation), wall s."""
    from lorakit.diffusion import COMPOSERS

    kind = COMPOSERS.get(method)
    groups = [list(range(len(prompts)))]
    if kind.uses_layout:  # one layout per composition: a batch per side
        groups = [[i for i, p in enumerate(prompts) if ("left" in p.split()) == left] for left in (True, False)]
    images, evaluations, generations = [None] * len(prompts), 0, 0
    t0 = time.perf_counter()
    for group in filter(None, groups):
        batch = [prompts[i] for i in group]
        extra = {"prompt": batch} if hasattr(kind, "words") else {}
        if kind.uses_layout:
            extra["layout"] = layout(concepts, batch[0])
        gens = [torch.Generator().manual_seed(seeds[i]) for i in group]
        with compose(pipe, list(concepts), method, **options, **extra) as stats:
            out = pipe(batch, num_inference_steps=steps, generator=gens, output_type="pt").images
        for i, image in zip(group, out):
            images[i] = image
        evaluations, generations = evaluations + stats.evaluations, generations + stats.generations
    return torch.stack(images), evaluations / generations, time.perf_counter() - t0


def score(judge, images, concepts, prompts) -> list[dict]:
    rows = []
    for reading, prompt in zip(judge.read(images), prompts):
        present = presence(reading, concepts)
        rows.append({"present": present, "all": all(present.values()),
                     "place": reading["position"] == ("left" if "left" in prompt.split() else "right")})
    return rows


def summarise(rows, evals, walls, n_images) -> dict:
    concepts = sorted({c for r in rows for c in r["present"]})
    per_concept = {c: float(np.mean([r["present"][c] for r in rows if c in r["present"]])) for c in concepts}
    return {"images": len(rows), "all_present": float(np.mean([r["all"] for r in rows])),
            "per_concept": per_concept, "concept_mean": float(np.mean(list(per_concept.values()))),
            "place": float(np.mean([r["place"] for r in rows])), "evaluations": float(np.mean(evals)),
            "wall_per_image_s": float(np.median(walls)), "wall_total_s": float(np.sum(walls) * 1.0)}


def run_k(pipe, judge, k, n, steps, grid, grid_prompts, methods=METHODS):
    """Every method on the same k-concept pairs; returns {method label: summary}."""
    by_combo: dict = {}
    for combo, prompt, seed in pairs(k, n):
        by_combo.setdefault(combo, []).append((prompt, seed))
    results = {}
    for method, options in methods:
        rows, evals, walls = [], [], []
        for combo, items in by_combo.items():
            prompts, seeds = [p for p, _ in items], [s for _, s in items]
            images, per_generation, wall = generate(pipe, combo, prompts, seeds, method, options, steps)
            rows += score(judge, images, combo, prompts)
            evals.append(per_generation)
            walls.append(wall / len(prompts))
            if k == 3 and combo == next(iter(by_combo)):
                grid.setdefault(label(method, options), images[:8])
                grid_prompts[:] = prompts[:8]
        results[label(method, options)] = summarise(rows, evals, walls, n)
        r = results[label(method, options)]
        print(f"  k={k} {label(method, options):16s} all={r['all_present']:.2f} place={r['place']:.2f} "
              f"evals/img={r['evaluations']:.1f} s/img={r['wall_per_image_s']:.3f}", flush=True)
    return results


def alone(pipe, judge, n, steps) -> dict:
    """Each LoRA alone on prompts with its concept: the ceiling for composition."""
    out = {}
    for concept in CONCEPTS:
        items = [(sample_scene(np.random.default_rng(i), (concept,)).prompt, 500 + i) for i in range(n)]
        prompts, seeds = [p for p, _ in items], [s for _, s in items]
        images, _, _ = generate(pipe, (concept,), prompts, seeds, "merge", {}, steps)
        out[concept] = float(np.mean([r["all"] for r in score(judge, images, (concept,), prompts)]))
    return out


def base_fidelity(pipe, judge, n, steps) -> dict:
    """The base model alone (adapters off) on base prompts: how often the judge reads back what was asked."""
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(n)]
    pipe.unet.disable_adapters()
    try:
        images = pipe([s.prompt for s in scenes], num_inference_steps=steps,
                      generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="pt").images
    finally:
        pipe.unet.enable_adapters()
    readings = judge.read(images)
    return {k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(readings, scenes)]))
            for k in ("shape", "colour", "position")}


def autolora_gates(pipe, gates_file: str | None, steps: int, out: Path) -> dict:
    """AutoLoRA's gates for the four LoRAs: read from ``gates_file``, or trained here and saved to ``out``."""
    from tqdm import tqdm

    from lorakit.diffusion.gates import load_gates
    from lorakit.diffusion.autolora_train import train_gates

    if gates_file:
        return {"gates": load_gates(gates_file), "file": gates_file}
    t0 = time.perf_counter()
    gates, losses = train_gates(pipe, list(CONCEPTS), steps=steps, batch=16, seed=0,
                                progress=lambda r: tqdm(r, desc="AutoLoRA gates", mininterval=10))
    gates.save(out, overwrite=True)
    k = max(1, steps // 10)
    return {"gates": gates, "file": str(out), "steps": steps, "batch": 16, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_tenth": float(np.mean(losses[:k])), "loss_last_tenth": float(np.mean(losses[-k:]))}


def check_claims(results: dict) -> list[dict]:
    rows = []
    for claim, metric, method, rel, ref, thr in CLAIMS:
        ks = ["3"] if "(3 concepts)" in claim else ["2", "3", "4"] if "(2-4 concepts)" in claim else ["2"] if "(2 concepts)" in claim else ["3", "4"]
        if any(m not in results[k] for k in ks for m in (method, ref)):
            continue  # a method left out of this run (--methods)
        a = float(np.mean([results[k][method][metric] for k in ks]))
        b = float(np.mean([results[k][ref][metric] for k in ks]))
        value = a / b if rel == "<=" else a - b
        ok = value <= thr if rel == "<=" else value > thr if rel == ">" else value >= thr
        floor = metric == "all_present" and a == b == 0  # both at zero: the testbed cannot tell them apart
        rows.append({"claim": claim, "measure": f"{metric}: {method} {'/' if rel == '<=' else '-'} {ref}",
                     "a": round(a, 3), "b": round(b, 3), "value": round(value, 3), "threshold": f"{rel} {thr}",
                     "holds": bool(ok), "verdict": "inconclusive (both 0)" if floor else "yes" if ok else "no"})
    return rows


def save_grid(grid: dict, path: Path) -> None:
    from PIL import Image

    rows = [torch.cat(list(imgs), dim=2) for imgs in grid.values()]  # (3, 32, 32 * 8) per method
    width = max(r.shape[2] for r in rows)
    img = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[2], 0, 2), value=1.0) for r in rows], dim=1)
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--zoo", default="runs/diffusion-zoo")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--pairs", type=int, default=None, help="prompt-seed pairs per concept count (overrides the mode)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (overrides the mode)")
    p.add_argument("--methods", default=None, help="comma-separated method labels to run (default: all)")
    p.add_argument("--gates", default=None, help="AutoLoRA gates file to use instead of training them here")
    p.add_argument("--gate-steps", type=int, default=None, help="AutoLoRA gate training steps (150 quick, 400)")
    args = p.parse_args(argv)
    n, steps = (48, 12) if args.quick else (100, 20)
    n, steps = args.pairs or n, args.steps or steps
    from safetensors.torch import load_file

    import diffusers.utils.logging

    from lorakit.diffusion.zoo import build

    diffusers.utils.logging.set_verbosity_error()

    zoo = Path(args.zoo)
    if not (zoo / "manifest.json").exists():
        build(zoo)
    pipe = ConceptPipeline.from_pretrained(zoo / "model")
    pipe.set_progress_bar_config(disable=True)
    load_loras(pipe, [zoo / "loras" / c for c in CONCEPTS])
    judge = Judge()
    judge.load_state_dict(load_file(str(zoo / "judge.safetensors")))
    if args.methods:
        keep = args.methods.split(",")
        METHODS[:] = [(m, o) for m, o in METHODS if label(m, o) in keep]
    start = time.time()
    trained = {}
    if ("autolora", {}) in METHODS:
        trained = autolora_gates(pipe, args.gates, args.gate_steps or (150 if args.quick else 400),
                                 Path("runs/autolora-gates.safetensors"))
        METHODS[METHODS.index(("autolora", {}))] = ("autolora", {"gates": trained.pop("gates")})
        print(f"  AutoLoRA gates: {trained}", flush=True)
    grid: dict = {}
    grid_prompts: list = []
    results = {**({"autolora_gates": trained} if trained else {}), "base": base_fidelity(pipe, judge, 48, steps),
               "alone": alone(pipe, judge, 24, steps)}
    print(f"  base model alone: {results['base']}", flush=True)
    print(f"  each LoRA alone: {results['alone']}", flush=True)
    methods = [(m, o) for m, o in METHODS if args.methods is None or label(m, o) in args.methods.split(",")]
    for k in (2, 3, 4):
        results[str(k)] = run_k(pipe, judge, k, n, steps, grid, grid_prompts, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out / "diffusion.png")
    data = {"command": command_line(), "machine": machine(), "load_average": load_average(),
            "settings": {"pairs_per_k": n, "steps": steps, "guidance": 3.0, "scheduler": "DDIM",
                         "methods": [label(m, o) for m, o in methods], "switch_every": 2,
                         "options": {label(m, o): o for m, o in methods},
                         "grid_rows": list(grid), "grid_prompts": grid_prompts},
            "results": results, "claims": check_claims(results), "wall_s": round(time.time() - start, 1)}
    write_json(out / "diffusion.json", data)
    from diffusion_report import write_report

    write_report(out / "diffusion.json", out / "diffusion.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
