"""Composing several LoRAs per denoising step on any diffusers pipeline.

``compose(pipe, adapters, method)`` is a context manager that stands in for the pipeline's denoiser (``unet`` or
``transformer``) while it is open: each call the pipeline makes at a denoising step goes to the registered
``Composer``, which asks for noise predictions under chosen adapters and weights (diffusers' ``set_adapters``) and
returns their combination. The pipeline's own loop, scheduler and guidance stay as they are; classifier-free
guidance is linear, so averaging the batched [uncond, text] predictions equals averaging after guidance.

A new generation is recognised by the timestep going up (denoising walks it down), which resets the composer.
Methods that act on the latent itself (CLoRA, LoRA-Composer) get it in ``update_latents``, called with the latent
the pipeline hands to ``scheduler.step`` (wrapped while the block is open); methods that change attention install
processors in ``bind`` and take them out in ``unbind``. After the block the denoiser's own forward, processors and
scheduler are back, with the composed LoRAs active at their weights (a merge).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..core.registry import Registry
from .adapters import activate
from .files import denoiser_of
from .shapes import SIZE

COMPOSERS = Registry("composition method")
Run = Callable[[Sequence[str], Sequence[float]], torch.Tensor]


class Composer:
    """One way of combining LoRAs at each denoising step; a subclass overrides ``predict``."""

    name = ""
    uses_layout = False
    slot = 0  # which call within the current step (pipelines that run guidance branches as separate calls make 2)

    def __init__(self, adapters: Sequence[str], weights: Optional[Sequence[float]] = None, layout=None, **options):
        if not adapters:
            raise ValueError(f"{self.name}: no LoRAs to compose")
        self.adapters = list(adapters)
        self.weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.adapters):
            raise ValueError(f"{self.name}: {len(self.adapters)} LoRAs but {len(self.weights)} weights")
        if layout is not None and not self.uses_layout:
            raise no_layout(self.name)
        self.layout = layout
        for key, value in options.items():
            if not hasattr(self, key) or key.startswith("_"):
                raise TypeError(f"method {self.name!r} has no option {key!r}")
            setattr(self, key, type(getattr(self, key))(value))

    def bind(self, pipe, denoiser) -> None:
        """Called when the block opens (install attention processors here)."""

    def unbind(self) -> None:
        """Called when the block closes (undo ``bind``)."""

    def update_latents(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The latent the scheduler steps from at ``timestep``, given the pipeline's; unchanged unless a method moves
        it."""
        return latents

    def reset(self, total_steps: int) -> None:
        """Called when a generation starts; ``total_steps`` is the scheduler's number of steps."""
        self.total_steps = total_steps

    def predict(self, step: int, run: Run) -> torch.Tensor:
        """The combined noise prediction at denoising step ``step`` (0-based); ``self.sample`` is the call's input.

        ``run(names, scales, on=None, rows=None)`` evaluates the denoiser with exactly ``names`` active, on
        ``on`` (default: the call's input) and, when ``rows`` is given, on those batch rows of every batched input
        (``on`` then holds just those rows)."""
        raise NotImplementedError


def no_layout(method: str) -> ValueError:
    """The error for a layout given to a method that takes none."""
    return ValueError(f"method {method!r} takes no layout; layout-aware methods: "
                      f"{', '.join(n for n in COMPOSERS if COMPOSERS.get(n).uses_layout) or '(none)'}")


@dataclass
class Stats:
    """What a composition cost: denoiser evaluations (calls) per generation, steps seen, adapters per call."""

    evaluations: int = 0
    steps: int = 0
    generations: int = 0
    calls: list = field(default_factory=list)  # (step, adapters, weights) of every evaluation
    composer: Optional[Composer] = None  # the method's instance, for inspection


def timesteps(timestep) -> torch.Tensor:
    """A timestep (a number or a tensor) as a flat tensor; a number lands on the CPU, whatever the default device."""
    return timestep.flatten() if torch.is_tensor(timestep) else torch.tensor([float(timestep)], device="cpu")


def _scalar(timestep) -> float:
    return float(timesteps(timestep)[0])


@contextmanager
def compose(pipe, adapters: Sequence[str], method: str = "merge", weights: Optional[Sequence[float]] = None,
            layout=None, **options):
    """Within the block, ``pipe(...)`` composes the loaded LoRAs ``adapters`` with the registered ``method``."""
    denoiser, component = denoiser_of(pipe)
    composer = COMPOSERS.get(method)(adapters, weights, layout=layout, **options)
    loaded = set(getattr(denoiser, "peft_config", {}) or {})
    missing = [a for a in composer.adapters if a not in loaded]
    if missing:
        raise KeyError(f"LoRA {missing[0]!r} is not loaded in the pipeline's {component}; loaded: "
                       f"{', '.join(sorted(loaded)) or '(none)'} (load it with load_lora_weights)")
    original = denoiser.forward
    signature = inspect.signature(original)
    first = next(iter(signature.parameters), None)  # the noisy input: ``sample`` (UNet) or ``hidden_states`` (DiT)
    if first is None or signature.parameters[first].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD \
            or "timestep" not in signature.parameters:
        raise TypeError(f"the pipeline's {component} forward{signature} does not name its noisy input first and a "
                        f"timestep argument, as diffusers' UNets and transformers do")
    stats = Stats(composer=composer)
    seen = {"t": None}
    scheduler = pipe.scheduler
    scheduler_step = scheduler.step

    def stepped(model_output, timestep, sample, *args, **kwargs):
        return scheduler_step(model_output, timestep, composer.update_latents(sample, timestep), *args, **kwargs)

    def forward(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        sample, timestep = call.arguments[first], call.arguments.get("timestep")
        return_dict = call.arguments.get("return_dict", True)
        t = _scalar(timestep)
        if seen["t"] is None or t > seen["t"]:
            composer.reset(len(pipe.scheduler.timesteps))
            stats.generations += 1
            stats.steps = -1
        if t != seen["t"]:
            stats.steps += 1
            composer.slot = -1
        seen["t"] = t
        composer.timestep = timestep
        step = stats.steps
        composer.slot += 1

        def run(names: Sequence[str], scales: Sequence[float], on=None, rows=None) -> torch.Tensor:
            stats.evaluations += 1
            stats.calls.append((step, tuple(names), tuple(scales)))
            activate(denoiser, names, scales)
            again = signature.bind(*args, **kwargs)
            if rows is not None:  # ``on``, when given with rows, holds those rows already; the timestep is cut too
                again.arguments.update({k: _rows(v, sample.shape[0], rows) for k, v in again.arguments.items()})
            if on is not None:
                again.arguments[first] = on
            again.arguments["return_dict"] = False
            return original(*again.args, **again.kwargs)[0]

        composer.sample = sample
        eps = composer.predict(step, run)
        return _wrap(eps, component) if return_dict else (eps,)

    composer.bind(pipe, denoiser)
    denoiser.forward = forward
    scheduler.step = stepped
    try:
        yield stats
    finally:
        del denoiser.forward  # the instance attribute goes; the class's forward shows again
        del scheduler.step
        composer.unbind()
        activate(denoiser, composer.adapters, composer.weights)
    stats.steps += 1


def _rows(value, batch: int, rows):
    """``value`` (a tensor, or a tuple/list/dict holding some) with batched tensors cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, batch, rows) for v in value)
    return value


def _wrap(eps: torch.Tensor, component: str):
    if component == "unet":
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=eps)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=eps)


def check_prompt(pipe, prompt: str, n_concepts: int) -> None:
    """Refuse more concepts than the prompt has tokens (each LoRA's concept needs a word to attach to)."""
    tokens = pipe.tokenizer.tokenize(prompt)
    if n_concepts > len(tokens):
        raise ValueError(f"{n_concepts} LoRAs but the prompt {prompt!r} has {len(tokens)} token(s); "
                         f"name each concept in the prompt")


def check_layout(boxes, n_concepts: int, size: int = SIZE) -> list[tuple[int, int, int, int]]:
    """Layout boxes (x0, y0, x1, y1) in pixels, one per LoRA, each inside the image; an error names a bad box."""
    boxes = [tuple(int(v) for v in b) for b in boxes]
    if len(boxes) != n_concepts:
        raise ValueError(f"{len(boxes)} layout boxes for {n_concepts} LoRAs; give one box per LoRA")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise ValueError(f"layout box {i + 1} ({x0},{y0},{x1},{y1}) is outside the {size}x{size} image or empty; "
                             f"boxes are x0,y0,x1,y1 with 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    return boxes
