"""``lorakit diffuse``: generate an image with several LoRAs composed by a registered method on a diffusers pipeline.

Every argument (method, weights, layout, prompt, files and their fit to the network) is checked before the first
denoising step; a user error is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``lorakit diffuse``."""
    p = sub.add_parser("diffuse", help="generate an image composing several LoRAs on a diffusers pipeline")
    p.add_argument("--model", required=True,
                   help="diffusers pipeline directory (model_index.json): a UNet or a diffusion transformer")
    p.add_argument("--lora", action="append", required=True, metavar="PATH",
                   help="LoRA file or directory with pytorch_lora_weights.safetensors; repeat for each concept")
    p.add_argument("--method", default="merge",
                   help="composition method: merge, switch, composite, cmlora, clora, lora_composer, autolora")
    p.add_argument("--prompt", required=True, help="the text prompt; it should name each LoRA's concept")
    p.add_argument("--weights", default=None, help="comma-separated weight per LoRA (default: 1 each)")
    p.add_argument("--layout", default=None,
                   help="one box per LoRA, 'x0,y0,x1,y1;x0,y0,x1,y1' in pixels; lora_composer only (the whole "
                        "image for a background LoRA)")
    p.add_argument("--gates", default=None, metavar="FILE",
                   help="trained fusion gates (autolora; from `lorakit diffuse-gates`)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. every=3 (switch) or cache=0 (cmlora)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="output image (.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)
    from .gates_cli import add_parser as add_gates_parser

    add_gates_parser(sub)


def _options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = {"true": 1, "false": 0}.get(value.lower(), value)
    return options


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None


def load_pipeline(model: str | Path):
    """A diffusers pipeline from a directory; the testbed's ConceptPipeline by its class name."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):  # loading bars and notices would bury our one line
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    model = Path(model)
    index = model / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
    spec = json.loads(index.read_text())
    if spec.get("_class_name") == "ConceptPipeline":
        from .pipeline import ConceptPipeline

        return ConceptPipeline.from_pretrained(model)
    from diffusers import DiffusionPipeline

    # components saved as absent (e.g. SD3 without its T5 encoder) are passed as None, as they were built
    absent = {k: None for k, v in spec.items() if isinstance(v, list) and v == [None, None]}
    return DiffusionPipeline.from_pretrained(model, **absent)


def run(args: argparse.Namespace) -> int:
    """Check everything, load the pipeline and LoRAs, compose, write the image atomically."""
    import torch

    from . import COMPOSERS, check_layout, check_prompt, compose, load_loras
    from .compose import no_layout
    from .files import denoiser_of
    from .tiny import generate_kwargs

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: expected a .png file")
    method = COMPOSERS.get(args.method)  # an unknown method is refused before anything loads
    if args.layout and not method.uses_layout:
        raise no_layout(args.method)
    n = len(args.lora)
    weights = _floats(args.weights, "--weights") if args.weights else None
    if weights is not None and len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} LoRAs")
    layout = None
    if args.layout:
        layout = [[int(v) for v in _floats(box, "--layout box")] for box in args.layout.split(";")]
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected at least 1")
    options = _options(args.option)
    if hasattr(method, "words"):  # attention-based methods find each LoRA's concept word in the prompt
        options["prompt"] = args.prompt
    if args.gates:
        options["gates"] = args.gates
    pipe = load_pipeline(args.model)
    if layout is not None:
        size = denoiser_of(pipe)[0].config.sample_size * getattr(pipe, "vae_scale_factor", 2)
        layout = check_layout(layout, n, size)
    check_prompt(pipe, args.prompt, n)
    names = load_loras(pipe, args.lora)
    generator = torch.Generator().manual_seed(args.seed)
    with compose(pipe, names, args.method, weights, layout=layout, **options) as stats:
        image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     generator=generator, **generate_kwargs(pipe)).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".png", delete=False) as tmp:
        image.save(tmp, format="PNG")
    os.replace(tmp.name, out)
    print(f"lorakit diffuse: {out} ({args.method}, {n} LoRAs, {stats.evaluations} denoiser evaluations)")
    return 0
