"""LoRAM: train LoRA on a pruned (optionally quantised) copy of the base, recover it for the full base.

Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models (Zhang et al., arXiv:2502.13533,
ICLR 2025; official code junzhang-zj/LoRAM, ``loram/0_*`` to ``4_*``). Steps:
  0. prune the base structurally (here: head groups and FFN channels, by weight magnitude or at random), keeping
     the kept indices per layer; 1. optionally align the pruned model by briefly training it in full on general
     text; 2. train LoRA on the pruned (optionally 4-bit: QLoRAM) model; 3. recover: put the factors back at the
     kept positions and zeros at the pruned ones (B rows of q/k/v/gate/up, A columns of o/down); 4. infer on the
     full base with the recovered adapter (or merge it there).
The recovered ΔW = s B* A* is exactly zero on every pruned coordinate, so on the full model the learned update
acts only where the pruned model had weights.

Files: ``save_recovered`` writes an ordinary PEFT directory for the full base (PEFT loads it without lorakit)
plus ``loram.json`` with the kept indices and the fingerprints of the full and the pruned base; ``load_recovered``
refuses, naming both fingerprints, a base the adapter was not recovered for.

Deviations, and why: pruning uses this package's structure (every block keeps the same number of groups and
channels, so the pruned base is a plain Hugging Face model; the paper prunes LLM-Pruner style, layers 4-78 of 80).
Only the ``zeroA`` recovery (the official default) exists: ``normA`` would put random updates on the full model's
pruned inputs. Alignment trains the pruned blocks' weights (every parameter inside a transformer block; the
embeddings and the task head, which pruning leaves whole, stay frozen, which keeps the optimiser state small) on the
data you pass: on the model's own loss (the paper's continued pre-training, for a causal LM on general text), or,
for models without a language-model head (sequence classifiers), by distillation: the pruned backbone's last hidden
states are fitted to the full base's on the same unlabelled text, which targets the mismatch the paper's step
reduces.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..core.fingerprint import record as base_record
from ..core.state import AdapterState
from ..formats.peft import load_peft, save_state
from .loraprune import check_ratio
from .quantize import quantize_
from .structure import Plan, apply_plan, blocks, fingerprint, kept_rows

SIDE_FILE = "loram.json"
CRITERIA = ("magnitude", "random")


@dataclasses.dataclass(frozen=True)
class LoRAMConfig:
    """How much to prune (fraction of head groups and FFN channels), by what, and whether to quantise the copy."""

    ratio: float = 0.5
    criterion: str = "magnitude"
    heads: bool = True
    quantize: Optional[str] = None  # e.g. "nf4": QLoRAM
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, found {self.criterion!r}")


@dataclasses.dataclass
class Recovery:
    """What recovery needs: per sliced module its axis, kept indices and full size; both bases' fingerprints."""

    modules: dict[str, dict]
    full_fingerprint: str
    pruned_fingerprint: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    base: Optional[dict] = None  # the full base's record (core.fingerprint), written as lorakit_base.json

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "base"}, indent=1) + "\n"


def _plan(model: nn.Module, config: LoRAMConfig) -> Plan:
    g = torch.Generator().manual_seed(config.seed)
    plan: Plan = {}
    for block in blocks(model):
        entry = {}
        for key, n, paths in (("channels", block.channels, block.ups), ("groups", block.groups, (block.q, block.k, block.v))):
            if n <= 1 or (key == "groups" and not config.heads):
                continue
            keep = n - int(config.ratio * n)
            if config.criterion == "random":
                score = torch.rand(n, generator=g)
            else:  # L2-normalised row magnitudes, summed over the layers that share the group (as LoRAPrune)
                score = torch.zeros(n)
                for p in paths:
                    rows = model.get_submodule(p).weight.detach().float().abs().sum(1).reshape(n, -1).sum(1)
                    score += rows / rows.norm().clamp_min(1e-12)
            entry[key] = score.argsort(descending=True)[:keep].sort().values.tolist()
        plan[block.path] = entry
    return plan


def prune_for_training(model: nn.Module, config: LoRAMConfig = LoRAMConfig(),
                       inplace: bool = False) -> tuple[nn.Module, Recovery]:
    """A pruned (and, with ``config.quantize``, quantised) copy of ``model`` to train LoRA on, and its Recovery.

    ``inplace=True`` prunes ``model`` itself: no second full-size copy exists while pruning, and none is kept
    while training (LoRAM's point); load the full base again to recover the adapter onto it.
    """
    if any(type(m).__module__.startswith("lorakit") for m in model.modules()):
        raise ValueError("prune the plain base model: it carries a lorakit adapter (merge or unwrap it first)")
    full = blocks(model)
    plan = _plan(model, config)
    sizes = {p: model.get_submodule(p).weight.shape for p in kept_rows(plan, full)}
    modules = {p: {"axis": axis, "kept": index.tolist(), "full": int(sizes[p][0 if axis == "rows" else 1])}
               for p, (axis, index) in kept_rows(plan, full).items()}
    recovery = Recovery(modules, fingerprint(model), config=dataclasses.asdict(config), base=base_record(model))
    small = apply_plan(model if inplace else copy.deepcopy(model), plan)
    recovery.pruned_fingerprint = fingerprint(small)
    if config.quantize:
        quantize_(small, config.quantize)
    return small, recovery


def align(small: nn.Module, data, teacher: Optional[nn.Module] = None, **fit_options) -> nn.Module:
    """The optional alignment step: train the pruned blocks' weights briefly on general text, then freeze them.

    Without ``teacher``, on the model's own loss (a causal LM on text: the paper's continued pre-training); with
    ``teacher`` (the full base), on the mean squared error between the two backbones' last hidden states.
    """
    from ..train import fit

    prefixes = tuple(b.path + "." for b in blocks(small))
    trained = [p for n, p in small.named_parameters() if n.startswith(prefixes)]
    loss_fn = None
    if teacher is not None:
        def loss_fn(model, batch):
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                target = teacher.base_model(**inputs).last_hidden_state
            found = getattr(model, "module", model).base_model(**inputs).last_hidden_state
            mask = inputs.get("attention_mask", torch.ones(found.shape[:2], device=found.device)).unsqueeze(-1)
            return ((found - target).pow(2) * mask).sum() / (mask.sum() * found.shape[-1])
    for p in small.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    try:
        fit(small, data, loss_fn=loss_fn, **fit_options)
    finally:
        for p in small.parameters():
            p.requires_grad_(False)
    return small


def recover(state: AdapterState, recovery: Recovery) -> AdapterState:
    """The adapter for the full base: factors at the kept positions, zeros at the pruned ones."""
    tensors = {}
    for path, named in state.tensors.items():
        named = dict(named)
        if not {"lora_A.weight", "lora_B.weight"} <= set(named) or len(named) != 2:
            raise ValueError(
                f"module '{path}': LoRAM recovers plain LoRA factors (lora_A, lora_B); found {sorted(named)}"
            )
        entry = recovery.modules.get(path)
        if entry is not None:
            index = torch.tensor(entry["kept"], dtype=torch.long)
            if entry["axis"] == "rows":
                b = named["lora_B.weight"]
                full = b.new_zeros(entry["full"], b.shape[1])
                full[index] = b
                named["lora_B.weight"] = full
            else:
                a = named["lora_A.weight"]
                full = a.new_zeros(a.shape[0], entry["full"])
                full[:, index] = a
                named["lora_A.weight"] = full
        tensors[path] = named
    return dataclasses.replace(state, tensors=tensors)


def save_recovered(small_with_adapter: nn.Module, recovery: Recovery, path) -> Path:
    """Recover the adapter of the pruned model and save it as a PEFT directory for the full base (+ loram.json);
    the full base's record goes beside it, so every lorakit loader refuses another base."""
    state = recover(AdapterState.from_model(small_with_adapter), recovery)
    base = None
    if recovery.base is not None:  # modules the adapter brings in full (a task head): their values do not matter
        brought = {n for n, v in base_record(small_with_adapter)["values"].items() if v is None}
        base = _skipping(recovery.base, brought)
    target = save_state(state, path, base=base)
    tmp = tempfile.NamedTemporaryFile("w", dir=target, prefix=".loram-", suffix=".json", delete=False)
    with tmp:
        tmp.write(recovery.to_json())
    os.replace(tmp.name, target / SIDE_FILE)
    return target


def _skipping(rec: dict, names: set) -> dict:
    """``rec`` with the values of ``names`` left out of the comparison (as ``core.fingerprint.record`` skips them)."""
    from ..core.fingerprint import _digest

    values = {n: (None if n in names else v) for n, v in rec["values"].items()}
    return {**rec, "values": values, "fingerprint": _digest(rec["architecture"], rec["shapes"], values)}


def read_recovery(path) -> Recovery:
    """The ``loram.json`` of a recovered adapter directory."""
    file = Path(path) / SIDE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; is {path} an adapter saved by lorakit.compress.loram.save_recovered?")
    return Recovery(**json.loads(file.read_text()))


def load_recovered(model: nn.Module, path) -> nn.Module:
    """Load a recovered LoRAM adapter onto its full base, after checking that this is the base it was made for."""
    recovery = read_recovery(path)
    found = fingerprint(model)
    if found != recovery.full_fingerprint:
        what = "the pruned training copy" if found == recovery.pruned_fingerprint else "another model"
        raise ValueError(
            f"{path}: this LoRAM adapter was recovered for the full base with fingerprint {recovery.full_fingerprint}; "
            f"the model given has fingerprint {found} ({what}). Load it on the unpruned base it was pruned from"
        )
    return load_peft(model, path)


__all__ = ["LoRAMConfig", "Recovery", "align", "load_recovered", "prune_for_training", "read_recovery", "recover",
           "save_recovered"]
