"""An early-exit cascade over adapters on one base model: ``AdapterCascade`` (after Xia & Bouganis, "Window-Based
Early-Exit Cascades for Uncertainty Estimation", ICCV 2023, arXiv:2303.08010; the thresholds are in selective.py).

Members are adapters on one frozen base (other seeds, ranks or methods), each with its own classification head.
Stage 1 runs member 0 on every sample. A sample whose confidence (MSP) lies outside the window around the operating
threshold exits with member 0's answer; the others go to stage 2, where members 1..M-1 run and the average of all
M members' softmax outputs answers (its confidence is the MSP of that average). Each output says how many stages
and member forwards a sample took.

The base's computation below the first block where the members differ runs once: stage 1 keeps the hidden states
leaving the last shared block, and the later members start from them (their shared blocks are skipped). A block is
shared when every member adapts it identically (the same method, per-module config and tensors) or not at all,
so members found by ``lorakit search-ensemble`` also share their common low layers. Anything before the blocks (the
embeddings) runs per member, so an adapter there is never wrongly shared.

Decisions: the blocks are the model's longest ``nn.ModuleList`` (as LISA); modules outside it count as before
the blocks when registered before them, otherwise after. Stage 2 runs its members one after another on the samples
inside the window (the card's per-sample multi-adapter batching is not done). Exits use MSP, the official code's
``confidence``; the ensemble's confidence is the MSP of the averaged probabilities (its ``confidence_ens``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..core.apply import wrapped_modules
from ..core.state import _NOT_COMPUTED, AdapterState
from ..formats.peft import load_peft
from ..train.schedules.lisa import find_layers
from .selective import Window, fit_window, msp

SPEC_VERSION = 1


@dataclass
class CascadeOutput:
    """Per sample: the answer's probabilities and confidence, stages run (1 or 2) and member forwards."""

    probs: torch.Tensor
    confidence: torch.Tensor
    stages: torch.Tensor
    members: torch.Tensor


class _Skip(nn.Module):
    """Stands in for a shared block: returns the hidden states stage 1 computed there."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


def _rows(output, rows: Optional[torch.Tensor]):
    if rows is None:
        return output
    if isinstance(output, torch.Tensor):
        return output[rows]
    if isinstance(output, tuple) and output and all(o is None for o in output[1:]):
        return (output[0][rows],) + output[1:]
    raise NotImplementedError(f"the model's blocks return {type(output).__name__}; the cascade shares prefixes of "
                              "blocks that return hidden states (a tensor, or a tuple with it first)")


@contextlib.contextmanager
def captured(blocks: nn.ModuleList, n: int, into: Optional[list]):
    """Inside the block, each forward appends the output of block ``n - 1`` to ``into`` (nothing when n is 0)."""
    if n == 0 or into is None:
        yield
        return
    hook = blocks[n - 1].register_forward_hook(lambda m, a, out: into.append(out))
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def replayed(blocks: nn.ModuleList, n: int, value):
    """Inside the block, the first ``n`` blocks are skipped and block ``n`` receives ``value`` (their output)."""
    kept = [blocks[j] for j in range(n)]
    try:
        for j in range(n):
            blocks[j] = _Skip(value)
        yield
    finally:
        for j, block in enumerate(kept):
            blocks[j] = block


def _member_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` that shares its parameters and buffers (the adapters then go on the copy)."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def _computation(state: AdapterState) -> dict[str, tuple]:
    """What each touched module path computes, comparable across members."""
    out: dict[str, tuple] = {}
    for path, tensors in state.tensors.items():
        cfg = dataclasses.asdict(dataclasses.replace(state.module_config(path), **_NOT_COMPUTED))
        out[path] = (state.config.method_name, repr(sorted(cfg.items())), tensors)
    for path, tensors in state.modules_to_save.items():
        out[path] = ("modules_to_save", "", tensors)
    for name, tensor in state.base_tensors.items():
        out[name.rpartition(".")[0]] = ("base", name, {name: tensor})
    return out


def _same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def shared_blocks(model: nn.Module, states: Sequence[AdapterState]) -> int:
    """How many blocks from the bottom every member computes identically (0 when they differ before the blocks)."""
    blocks_path, blocks = find_layers(model)
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    touched = [_computation(s) for s in states]

    def level(path: str) -> int:
        for i in range(len(blocks)):
            if path.startswith(f"{blocks_path}.{i}.") or path == f"{blocks_path}.{i}":
                return i
        return -1 if order.get(path, len(order)) < order[blocks_path] else len(blocks)

    differing = [level(p) for p in set().union(*touched)
                 if not all(p in t and p in touched[0] and _same(t[p], touched[0][p]) for t in touched)]
    return max(0, min(differing, default=len(blocks)))


class AdapterCascade:
    """A window-based early-exit cascade over adapters on one base model (see the module docstring)."""

    def __init__(self, base: nn.Module, members: Sequence[AdapterState | str | Path], window: Optional[Window] = None,
                 tokenizer=None, max_length: int = 128, label_names: Optional[Sequence[str]] = None):
        if len(members) < 2:
            raise ValueError(f"a cascade needs at least 2 members, found {len(members)}")
        if wrapped_modules(base):
            raise ValueError("AdapterCascade takes the plain base model; it found adapters on it (unwrap it first)")
        self.models: list[nn.Module] = []
        for member in members:
            model = _member_copy(base)
            if isinstance(member, AdapterState):
                member.load_into(model)
            else:
                load_peft(model, member)  # checks the base the adapter records
            self.models.append(model.eval())
        self.states = [AdapterState.from_model(m) for m in self.models]
        self.blocks_path, _ = find_layers(self.models[0])
        self.shared = shared_blocks(self.models[0], self.states)
        self.window, self.tokenizer, self.max_length = window, tokenizer, max_length
        self.label_names = list(label_names) if label_names else None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.models)

    def _blocks(self, i: int) -> nn.ModuleList:
        return self.models[i].get_submodule(self.blocks_path)

    @torch.no_grad()
    def member_logits(self, i: int, inputs: dict, prefix=None, capture: Optional[list] = None) -> torch.Tensor:
        """Member ``i``'s logits; from the shared hidden states ``prefix`` when given (stage-1 output of the shared
        blocks for the same rows), else in full, appending the shared blocks' output to ``capture``."""
        blocks = self._blocks(i)
        ctx = replayed(blocks, self.shared, prefix) if prefix is not None else captured(blocks, self.shared, capture)
        with ctx:
            return self.models[i](**inputs).logits

    @torch.no_grad()
    def member_probs(self, batch: dict) -> torch.Tensor:
        """[M, batch, classes] softmax outputs of every member, the shared blocks computed once."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        kept: list = []
        first = self.member_logits(0, inputs, capture=kept)
        prefix = kept[0] if kept else None
        rest = [self.member_logits(i, inputs, prefix) for i in range(1, len(self))]
        return torch.stack([first, *rest]).to(torch.float64).softmax(-1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> CascadeOutput:
        """Run the cascade on a tokenised batch (``input_ids``, ``attention_mask``; ``labels`` is ignored)."""
        if self.window is None:
            raise ValueError("the cascade has no window yet: calibrate(...) it on validation data, or give window=")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self._lock:
            kept: list = []
            probs = self.member_logits(0, inputs, capture=kept).to(torch.float64).softmax(-1)
            confidence = msp(probs)
            inside = self.window.inside(confidence)
            stages = torch.ones(len(probs), dtype=torch.long, device=probs.device)
            members = torch.ones(len(probs), dtype=torch.long, device=probs.device)
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                sub = {k: v[rows] for k, v in inputs.items()}
                prefix = _rows(kept[0], rows) if kept else None
                later = [self.member_logits(i, sub, prefix).to(torch.float64).softmax(-1) for i in range(1, len(self))]
                probs[rows] = torch.stack([probs[rows], *later]).mean(0)
                confidence[rows] = msp(probs[rows])
                stages[rows], members[rows] = 2, len(self)
        return CascadeOutput(probs, confidence, stages, members)

    def calibrate(self, batches, risk: float = 0.05, width: float = 0.1) -> Window:
        """Fit tau and the window on validation batches (with ``labels``) from member 0's confidences; returns it."""
        conf, correct = [], []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            probs = self.member_logits(0, inputs).to(torch.float64).softmax(-1)
            conf.append(msp(probs))
            correct.append(probs.argmax(-1) == batch["labels"])
        self.window = fit_window(torch.cat(conf), torch.cat(correct), risk=risk, width=width)
        return self.window

    def classify(self, texts: Sequence[str]) -> list[dict]:
        """Label, probabilities, stages and member forwards for each text (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this cascade has no tokenizer; build it with tokenizer= or from a spec")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.models[0].parameters()).device
        out = self({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)})
        names = self.label_names or [str(i) for i in range(out.probs.shape[1])]
        return [{"label": names[int(p.argmax())], "probabilities": dict(zip(names, p.tolist())),
                 "confidence": float(c), "stages": int(s), "member_forwards": int(m)}
                for p, c, s, m in zip(out.probs, out.confidence, out.stages, out.members)]

    @classmethod
    def from_spec(cls, path: str | Path, device: str | torch.device = "cpu") -> "AdapterCascade":
        """Load a cascade spec JSON (base model, member adapter directories, window) as written by ``write_spec``,
        its members on ``device``."""
        from .. import zoo

        path = Path(path)
        try:
            spec = json.loads(path.read_text())
            members = [path.parent / m for m in spec["members"]]
            window = Window(**spec["window"]) if spec.get("window") else None
            base_model = spec["base_model"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a cascade spec ({type(e).__name__}: {e}); expected JSON with 'base_model', "
                             "'members' (adapter directories relative to the spec) and 'window'") from None
        labels = spec.get("label_names")
        base, tokenizer = zoo.load(base_model, "seq_cls", num_labels=len(labels) if labels else None)
        return cls(base.to(device), members, window, tokenizer, spec.get("max_length", 128), labels)


def write_spec(path: str | Path, base_model: str, members: Sequence[str | Path], window: Optional[Window],
               label_names: Optional[Sequence[str]] = None, max_length: int = 128, **extra) -> Path:
    """Write a cascade spec JSON (members relative to its folder) atomically."""
    path = Path(path)
    rel = [os.path.relpath(Path(m).resolve(), path.parent.resolve()) for m in members]
    spec = {"version": SPEC_VERSION, "base_model": base_model, "members": rel,
            "window": window.to_dict() if window else None, "label_names": list(label_names) if label_names else None,
            "max_length": max_length, **extra}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(path)
    return path
