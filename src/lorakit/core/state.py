"""AdapterState: an adapter as data (config + tensors per module), with no modules attached.

It is the currency between training, files, merging, federated aggregation and serving. ``tensors`` maps a
module path to that module's adapter tensors, keyed as in PEFT files; ``modules_to_save`` likewise holds the
full tensors of modules trained in full.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from .adapter import Adapter, AdapterShapeError, LowRank, ModulesToSave
from .apply import apply, config_of, wrapped_modules
from .named import adapter_names, layers_of, selected
from .capabilities import Capabilities, require
from .config import AdapterConfig, LoRAConfig
from .registry import METHODS
from .targets import token_embeddings

Tensors = dict[str, dict[str, torch.Tensor]]
# Config fields that choose modules or describe provenance: the per-module computation does not depend on them.
_NOT_COMPUTED = dict(target_modules=None, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                     modules_to_save=None, init_lora_weights=True, task_type=None, base_model_name_or_path=None,
                     revision=None, inference_mode=False)


@dataclass
class AdapterState:
    """An adapter's config and tensors, keyed by module path."""

    config: AdapterConfig
    tensors: Tensors
    modules_to_save: Tensors = field(default_factory=dict)
    base_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameters carried by the file, by name

    @property
    def method(self):
        return METHODS.get(self.config.method_name)

    def modules(self) -> list[str]:
        """Paths of the adapted modules."""
        return list(self.tensors)

    def module_config(self, path: str) -> AdapterConfig:
        return self.config.for_module(path)

    def _adapter_class(self):
        return self.method.adapter_classes[0]

    @property
    def capabilities(self) -> Optional[Capabilities]:
        """What the method declares its update allows under this config (core/capabilities.py)."""
        return self.method.capabilities and self._adapter_class().capabilities_for(self.config)

    def require(self, capability: str, doing: str) -> None:
        """Raise CapabilityError (naming the method and what to do) unless the method declares ``capability``."""
        require(self.capabilities, capability, self.config.method_name, doing)

    def _class_for(self, path: str):
        """The adapter class of one module: a parameter adapter's A stacks r rows per expert (target_parameters)."""
        a = self.tensors.get(path, {}).get("lora_A.weight")
        if getattr(self.config, "target_parameters", None) and a is not None and a.shape[0] != self.module_config(path).r:
            return next(c for c in self.method.adapter_classes if c.wraps_parameters)
        return self._adapter_class()

    def delta(self, path: str, base_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ΔW of one module, in the base weight's layout (DoRA-like methods need ``base_weight``)."""
        if path not in self.tensors:
            raise KeyError(f"no adapter on module '{path}'; adapted modules: {', '.join(self.modules()[:10])}")
        return self._class_for(path).delta(self.tensors[path], self.module_config(path), base_weight)

    def low_rank(self, path: str) -> Optional[LowRank]:
        """(A, B, scale) of one module, or None when the method's update is not exactly low-rank."""
        return self._class_for(path).low_rank(self.tensors[path], self.module_config(path))

    def num_parameters(self) -> int:
        """Number of stored scalars (adapter tensors and ``modules_to_save``)."""
        grouped = sum(t.numel() for g in (self.tensors, self.modules_to_save) for d in g.values() for t in d.values())
        return grouped + sum(t.numel() for t in self.base_tensors.values())

    def map(self, fn) -> "AdapterState":
        """A new state with ``fn`` applied to every tensor."""
        conv = lambda g: {p: {k: fn(t) for k, t in d.items()} for p, d in g.items()}  # noqa: E731
        base = {k: fn(t) for k, t in self.base_tensors.items()}
        return AdapterState(self.config, conv(self.tensors), conv(self.modules_to_save), base)

    def to(self, *args, **kwargs) -> "AdapterState":
        return self.map(lambda t: t.to(*args, **kwargs))

    def clone(self) -> "AdapterState":
        return self.map(lambda t: t.detach().clone())

    def replace(self, **changes) -> "AdapterState":
        """A copy with config fields replaced."""
        return AdapterState(dataclasses.replace(self.config, **changes), self.tensors, self.modules_to_save, self.base_tensors)

    def to_lora(self) -> "AdapterState":
        """This adapter as a plain LoRA state (PEFT- and vLLM-loadable), for methods whose update is low-rank.

        Each module's ``low_rank`` (A, B, scale) becomes ``lora_A = A``, ``lora_B = scale · B`` with scaling 1
        (``lora_alpha = r``; modules of another rank get ``rank_pattern``/``alpha_pattern`` entries). Linear and
        Conv1D modules only.
        """
        if type(self.config) is LoRAConfig and not self.config.use_dora:
            return self
        self.require("exportable_to_lora", "export the adapter as a plain LoRA")
        tensors, ranks = {}, {}
        for path in self.tensors:
            factors = self.low_rank(path)
            if factors is None or factors[0].dim() != 2:
                raise ValueError(f"module '{path}': method '{self.config.method_name}' has no exact low-rank form to "
                                 "export as LoRA; merge it into the base weights instead")
            a, b, scale = factors
            tensors[path] = {"lora_A.weight": a.detach().clone(), "lora_B.weight": (b * scale).detach().clone()}
            ranks[path] = a.shape[0]
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else self.config.r
        pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(AdapterConfig)}
        fields.update(r=r, rank_pattern=pattern, init_lora_weights=True)
        config = LoRAConfig(**fields, lora_alpha=r, alpha_pattern=dict(pattern),
                            lora_dropout=getattr(self.config, "lora_dropout", 0.0))
        return AdapterState(config, tensors, self.modules_to_save, self.base_tensors)

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: Optional[str] = None) -> "AdapterState":
        """The state of the model's adapter (the one named, if it has several), tensors detached, on CPU."""
        name = selected(model, adapter_name, "take the adapter's state")
        config = config_of(model, name)
        tensors: Tensors = {}
        saved: Tensors = {}
        for path, module in layers_of(model, name).items():
            group = saved if isinstance(module, ModulesToSave) else tensors
            group[path] = {k: v.detach().cpu().clone() for k, v in module.adapter_tensors().items()}
        base_tensors = {}
        if config.bias != "none":
            inside = tuple(p + "." for p in saved)
            base_tensors = {  # trained base biases: saved under their own names, as PEFT does
                n: p.detach().cpu().clone()
                for n, p in model.named_parameters()
                if p.requires_grad and n.endswith("bias") and not n.startswith(inside) and ".lora_" not in n
            }
        return cls(config, tensors, saved, base_tensors)

    def _check_computes_like(self, current: AdapterConfig, paths) -> None:
        """Refuse to copy tensors into adapters whose config computes differently (the layers keep their own)."""
        for path in paths:
            ours, theirs = (dataclasses.asdict(dataclasses.replace(c.for_module(path), **_NOT_COMPUTED))
                            for c in (self.config, current))
            if self.config.method_name != current.method_name or ours != theirs:
                fields = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
                raise ValueError(
                    f"module '{path}': the model already has a '{current.method_name}' adapter that differs from the "
                    f"'{self.config.method_name}' adapter being loaded in {', '.join(fields) or 'its method'}; load "
                    "into the base model, or unwrap(model) first"
                )

    def _fit_vocabulary(self, model: nn.Module) -> None:
        """Resize the base model's vocabulary to the adapter's when the file carries the resized embeddings."""
        emb, head = token_embeddings(model)
        if not isinstance(emb, nn.Embedding):
            return
        path = next(p for p, m in model.named_modules() if m is emb)
        rows = {t.shape[0] for k, t in self.base_tensors.items() if k in (f"{path}.weight", f"{path}.base_layer.weight")}
        lora_a = self.tensors.get(path, {}).get("lora_embedding_A")
        want = next(iter(rows), lora_a.shape[1] if lora_a is not None else emb.num_embeddings)
        if want == emb.num_embeddings:
            return
        fix = f"call model.resize_token_embeddings({want}) before loading"
        if not rows:
            raise AdapterShapeError(
                f"module '{path}': the adapter covers a vocabulary of {want} tokens, the model {emb.num_embeddings}, and "
                f"the file does not carry the resized embedding weights; {fix} and load the embeddings it was trained with")
        head_path = next((p for p, m in model.named_modules() if m is head), None)
        head_saved = any(k in self.base_tensors for k in (f"{head_path}.weight", f"{head_path}.base_layer.weight"))
        if head is not None and head.weight is not emb.weight and not head_saved:
            raise AdapterShapeError(
                f"module '{path}': the adapter was trained with a vocabulary of {want} tokens (the model has "
                f"{emb.num_embeddings}); its output head '{head_path}' is not tied to the embeddings and its new rows are "
                f"not in the file, so resizing here would invent them; {fix}, with the head it was trained with")
        if not hasattr(model, "resize_token_embeddings"):
            raise AdapterShapeError(f"module '{path}': the adapter has a vocabulary of {want} tokens, the model "
                                    f"{emb.num_embeddings}; resize the model's embeddings to {want} rows before loading")
        model.resize_token_embeddings(want, mean_resizing=False)  # every new row is then copied from the file

    def load_into(self, model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
        """Copy the tensors into the model's adapter (the one named); a base model, or a new name, gets it first.

        Into an adapter the model has, the tensors are copied in place (a hot swap: the same parameters, so a
        compiled model does not recompile), after checking that its config computes alike.
        """
        from .multi import add_adapter

        fresh = not wrapped_modules(model)
        added = not fresh and adapter_name is not None and adapter_name not in adapter_names(model)
        with undone_on_error(model, adapter_name):
            if fresh:
                self._fit_vocabulary(model)
                apply(model, self.config, **({"adapter_name": adapter_name} if adapter_name else {}))
            elif added:
                add_adapter(model, adapter_name, self.config)
            self._copy_into(model, selected(model, adapter_name, "load an adapter into the model"), fresh or added)
        return model

    def _copy_into(self, model: nn.Module, adapter_name: str, new: bool) -> None:
        """Copy the tensors into one adapter's layers: every module and shape is checked before anything changes."""
        found = layers_of(model, adapter_name)
        expected = {p for p, m in found.items() if isinstance(m, Adapter)}
        extra = sorted(set(self.tensors) - expected)
        missing = sorted(expected - set(self.tensors))
        if extra or missing:
            raise AdapterShapeError(
                "the adapter and the model disagree on which modules are adapted: "
                + (f"not in the model: {', '.join(extra[:8])}; " if extra else "")
                + (f"no tensors for: {', '.join(missing[:8])}" if missing else "")
            )
        if not new:
            self._check_computes_like(config_of(model, adapter_name), sorted(expected))
        groups = list(self.tensors.items()) + list(self.modules_to_save.items())
        for path, tensors in groups:
            if path not in found:
                raise AdapterShapeError(f"module '{path}' is in the adapter but has no adapter in the model")
            own = found[path].adapter_tensors()
            for key in sorted(own.keys() & tensors.keys()):
                if tuple(own[key].shape) != tuple(tensors[key].shape):
                    raise AdapterShapeError(
                        f"module '{path}', tensor '{key}': the model expects shape {tuple(own[key].shape)}, the "
                        f"adapter has {tuple(tensors[key].shape)}. Was the adapter trained for another base model "
                        "or with another rank?")
        for path, tensors in groups:
            found[path].load_adapter_tensors(tensors)
        if self.base_tensors:
            params = dict(model.named_parameters(remove_duplicate=False))  # tied heads keep their own name
            with torch.no_grad():
                for name, value in self.base_tensors.items():
                    if name not in params or params[name].shape != value.shape:
                        found_shape = tuple(params[name].shape) if name in params else "no such parameter"
                        raise AdapterShapeError(
                            f"base tensor '{name}' in the adapter: the model has {found_shape}, the adapter "
                            f"{tuple(value.shape)}"
                        )
                    params[name].copy_(value)


@contextlib.contextmanager
def undone_on_error(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[None]:
    """A load of ``adapter_name`` in the block that raises leaves the model as it was: a bare model is unwrapped and
    gets its vocabulary size back, a new adapter name is deleted again."""
    from .apply import unwrap
    from .multi import delete_adapter

    fresh = not wrapped_modules(model)
    added = not fresh and adapter_name is not None and adapter_name not in adapter_names(model)
    emb = token_embeddings(model)[0]
    vocabulary = emb.num_embeddings if isinstance(emb, nn.Embedding) else None
    try:
        yield
    except BaseException:
        if fresh:
            if wrapped_modules(model):
                unwrap(model)
            emb = token_embeddings(model)[0]
            if vocabulary is not None and isinstance(emb, nn.Embedding) and emb.num_embeddings != vocabulary:
                model.resize_token_embeddings(vocabulary)
        elif added and adapter_name in adapter_names(model):
            delete_adapter(model, adapter_name)
        raise
