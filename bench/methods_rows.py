"""The rows of bench/methods.py, read from the registries when the benchmark runs, and how each is built.

Rows: the head alone (the floor every adapter must clear); every method in ``lorakit.METHODS`` (its config from the CLI's common knobs, ``lorakit.jobs.
method_config``: r = 8, lora_alpha = 16, no dropout, plus the few ``OPTIONS`` below); SHiRA's data-driven
supports (gradient, SNIP) when SHiRA is registered; LoRA with every initialiser in ``lorakit.INITIALIZERS``;
and full fine-tuning. Rows whose method needs calibration data get it from the task's first training
batches through the interface the method's branch defines, looked up here at run time; a row whose
interface is missing is skipped with that reason, so the table fills in as methods land on main.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import lorakit
from lorakit import INITIALIZERS, METHODS
from lorakit.jobs import method_config
from lorakit.train.schedule import warmup_count

RANK, ALPHA = 8, 16
CALIBRATION_BATCHES = 4
WARMUP_RATIO = 0.05  # fit's default
DYLORA_RANKS = (1, 2, 4, 8)
HEAD = "classifier."  # the new head's parameter prefix in both tasks' models (BERT and ViT)

# (lr, where it comes from); every other row trains at LoRA's lr, as the papers compare against LoRA
LR = {
    "lora": (1e-3, "LoRA's lr (the demo's)"),
    "nola": (5e-3, "NOLA paper, GPT-2 E2E"),
    "full": (1e-4, "a common full fine-tuning lr for BERT-size models"),
    "head": (2e-3, "the demo's head-only lr"),
}
# config fields beyond the common knobs, with the reason
OPTIONS = {
    "nola": ({"num_basis_A": 32, "num_basis_B": 32}, "32 + 32 coefficients per layer, fewer than rank-1 LoRA's in + out "
                                                     "on both tasks (768 on MiniLM, 128 on the ViT): its claim's setting"),
    "randlora": ({"r": 32}, "r is the rank of the shared random bases (default 32, s = 640/32 = 20); trainable "
                            "parameters fall as it grows, and r = 8 would train about 3x LoRA's count"),
}
# per-step and evaluation hooks a method's module defines: a fit-callback factory (model, seed) and a rank setter
STEP_HOOKS = {"dylora": "rank_sampler"}
RANK_SWEEPS = {"dylora": "set_rank"}


@dataclass(frozen=True)
class Row:
    """One benchmark row: a method (or full fine-tuning) with its settings."""

    name: str
    kind: str  # method | variant | initialiser | full | head | claim
    method: str = ""
    options: dict = field(default_factory=dict)
    init: str = ""
    lr: float = 1e-3
    lr_source: str = ""
    note: str = ""

    def spec(self) -> dict:
        """Everything that decides this row's numbers (the cache checks it): all fields but the prose."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("lr_source", "note")}


def _lr(key: str) -> tuple[float, str]:
    return LR[key] if key in LR else (LR["lora"][0], "LoRA's: no method-specific value")


def rows() -> list[Row]:
    """Every row, in registry order: methods, SHiRA's data-driven supports, initialisers, full fine-tuning."""
    out = []
    for name in METHODS.names():
        options, note = OPTIONS.get(name, ({}, ""))
        out.append(Row(name, "method", name, options, "", *_lr(name), note))
    if "shira" in METHODS:
        for mask in ("gradient", "snip"):
            out.append(Row(f"shira_{mask}", "variant", "shira", {"mask_type": mask}, "", *_lr("shira"),
                           f"SHiRA with the {mask} support, scored on the calibration batches"))
    for init in INITIALIZERS.names():
        out.append(Row(init, "initialiser", "lora", {}, init, *_lr("lora"), f"LoRA with init_lora_weights={init!r}"))
    out.append(Row("full", "full", "", {}, "", *_lr("full"), "every weight trains (the reference)"))
    out.append(Row("head", "head", "", {}, "", *_lr("head"), "only the new classification head trains (the floor)"))
    return out


def claim_rows() -> list[Row]:
    """Extra rows that only the claims table uses: LoRA trained separately at DyLoRA's ranks below r."""
    if "dylora" not in METHODS:
        return []
    return [Row(f"lora_r{b}", "claim", "lora", {"r": b}, "", *_lr("lora"), f"LoRA at r = {b}, for the DyLoRA claim")
            for b in DYLORA_RANKS if b < RANK]


def find(name: str) -> Row:
    """The row called ``name``."""
    for row in rows() + claim_rows():
        if row.name == name:
            return row
    raise KeyError(f"no benchmark row {name!r}; rows here: {', '.join(r.name for r in rows() + claim_rows())}")


# -- interfaces a row needs, looked up at run time ------------------------------------------------------
def _attr(module: str, name: str) -> Optional[Callable]:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _module_hook(method: str, table: dict) -> Optional[Callable]:
    if method not in table or method not in METHODS:
        return None
    module = sys.modules[METHODS.get(method).adapter_classes[0].__module__]
    return getattr(module, table[method], None)


def _loss(model, batch):
    return model(**batch).loss


def calibration(row: Row) -> tuple[Optional[Callable], str]:
    """(build(model, config, batches) or None, what it is / why it is missing) for rows that need data."""
    if row.init and getattr(INITIALIZERS.get(row.init), "needs_data", False):
        initialize = _attr("lorakit.init", "initialize")
        if initialize is None:
            return None, "needs calibration data, and lorakit.init.initialize is not here"
        return (lambda m, c, b: initialize(lorakit.apply(m, c), b)), "lorakit.init.initialize"
    if row.options.get("mask_type") in ("gradient", "snip"):
        fn = _attr("lorakit.init.shira_masks", "calibrate")
        if fn is None:
            return None, "needs calibration data, and lorakit.init.shira_masks.calibrate is not here"
        return (lambda m, c, b: fn(m, c, b, _loss)), "lorakit.init.shira_masks.calibrate"
    if row.method in METHODS and any(getattr(c, "calibration", None) for c in METHODS.get(row.method).adapter_classes):
        fn = _attr("lorakit.init", "calibrate")
        if fn is None:
            return None, "needs calibration data, and lorakit.init.calibrate is not here"
        return (lambda m, c, b: fn(m, c, b, _loss)), "lorakit.init.calibrate"
    return None, ""


def unavailable(row: Row) -> str:
    """Why ``row`` cannot run on this checkout ('' when it can)."""
    build, why = calibration(row)
    if build is None and why:
        return why
    if row.method in STEP_HOOKS and _module_hook(row.method, STEP_HOOKS) is None:
        return f"its training needs {STEP_HOOKS[row.method]} from its module, which is missing"
    return ""


def config_for(row: Row, targets: list, steps: int):
    """The adapter config of ``row`` on ``targets`` for a run of ``steps`` optimiser steps."""
    config = method_config(row.method, RANK, ALPHA, 0.0, targets, "classification")
    names = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in row.options.items() if k in names}
    if row.init:
        changes["init_lora_weights"] = row.init
    if "first_step_lr" in names:  # LoRA-SB's η₁: the lr of the first warm-up step, as its official scripts
        changes["first_step_lr"] = row.lr / max(1, warmup_count(steps, WARMUP_RATIO, None))
    return dataclasses.replace(config, **changes)


def prepare(row: Row, model: torch.nn.Module, task, steps: int, batch_size: int, seed: int) -> list[Callable]:
    """Put ``row``'s adapter on ``model`` (calibrating where needed); returns the per-step callbacks for fit."""
    torch.manual_seed(seed)  # the adapter's random parts
    if row.kind in ("full", "head"):
        for n, p in model.named_parameters():
            p.requires_grad_(row.kind == "full" or n.startswith(HEAD))
        return []
    config = config_for(row, task.targets, steps)
    build, _ = calibration(row)
    if build is not None:
        build(model, config, task.batches(CALIBRATION_BATCHES, batch_size))
    else:
        lorakit.apply(model, config)
    factory = _module_hook(row.method, STEP_HOOKS)
    return [] if factory is None else [factory(model, seed)]


def rank_sweep(row: Row, model: torch.nn.Module, evaluate: Callable) -> dict:
    """{rank: metrics} at each DyLoRA rank up to r, for methods that run at any rank after training."""
    set_rank = _module_hook(row.method, RANK_SWEEPS)
    if set_rank is None:
        return {}
    out = {}
    for b in DYLORA_RANKS:
        if b <= RANK:
            set_rank(model, b)
            out[str(b)] = evaluate(model)
    set_rank(model, None)
    return out


def parameter_counts(model: torch.nn.Module) -> dict:
    """Trainable parameters in all, and those inside adapters (without the head or other modules_to_save)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = lorakit.adapters(model).values()
    inside = sum(p.numel() for a in layers for n, p in a.named_parameters()
                 if p.requires_grad and not n.startswith("base_layer."))
    return {"trainable": total, "adapter": inside if layers else total}


def rank_one_counts(task) -> dict:
    """Parameter counts of LoRA at rank 1 on ``task``'s targets (NOLA's claim compares against it)."""
    model = task.model(0)
    lorakit.apply(model, dataclasses.replace(config_for(find("lora"), task.targets, 1), r=1))
    return parameter_counts(model)


def peft_twin(row: Row, model: torch.nn.Module) -> tuple[Optional[torch.nn.Module], str]:
    """A copy of ``model``'s base with PEFT's implementation of its adapter, loaded from lorakit's file (the same
    weights; the same base, also where an initialiser moved part of it into the adapter), or (None, why not).
    Initialisations are not re-run in PEFT: the step is what is timed."""
    if row.kind in ("full", "head"):
        return None, "no adapter"
    if row.kind not in ("method", "initialiser"):
        return None, "as its method's row"
    fresh = lorakit.unwrap(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_peft(model, d)
        path = Path(d) / "adapter_config.json"
        data = json.loads(path.read_text())
        if str(data.get("peft_type", "")).startswith("LORAKIT"):
            return None, "not in PEFT"
        if isinstance(data.get("init_lora_weights"), str):
            data["init_lora_weights"] = True
            path.write_text(json.dumps(data))
        try:
            from peft import PeftModel
        except ImportError:
            return None, "peft is not installed"
        return PeftModel.from_pretrained(fresh, d, is_trainable=True), f"peft {data['peft_type']}"
