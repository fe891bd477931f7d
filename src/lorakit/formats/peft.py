"""PEFT's checkpoint format: the only module that knows its key strings and ``adapter_config.json``.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a pickled
``adapter_model.bin``, read only with ``allow_pickle=True``: unpickling can run code). Keys are
``base_model.model.<module path>.<tensor name>``; adapters other than the default live in sub-folders.
Writes go to a temporary directory whose files are renamed into place, so no half-written adapter is left
behind; other files in an existing directory (sub-folder adapters, a README) are kept.
lorakit also writes ``lorakit_base.json`` beside them: the base model's record (``core.fingerprint``), which
``load_peft`` checks. It is a separate file because PEFT warns about every key of ``adapter_config.json`` it
does not know ("saved with a newer PEFT version"), and the record is long. Reading a directory checks that the
config agrees with the tensors (LoRA ranks), so ``info``, ``merge`` and ``load_peft`` refuse one that does not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import fingerprint
from ..core.apply import config_of, set_trainable, wrapped_modules
from ..core.named import DEFAULT, adapter_names, check_name, selected
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from ..core.state import AdapterState, undone_on_error
from ..core.targets import is_module_to_save
from .peft_embeddings import embedding_weights

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
BASE_NAME = "lorakit_base.json"
PathLike = Union[str, os.PathLike]
PEFT_WRAPPER_COPIES = ("modules_to_save.", "original_module.")  # inside peft's ModulesToSaveWrapper


class AdapterFileError(ValueError):
    """An adapter directory that cannot be read as asked."""


def config_class_for(data: dict, source: str) -> type:
    """The registered config class that claims a PEFT config dict."""
    for name in METHODS.names():
        cls = METHODS.get(name).config_class
        if cls.claims(data):
            return cls
    known = sorted({METHODS.get(n).config_class.peft_type for n in METHODS.names()})
    raise AdapterFileError(
        f"{source}: peft_type={data.get('peft_type')!r} is not a method lorakit knows "
        f"(known peft_type values: {', '.join(known)}; methods: {', '.join(METHODS.names())})"
    )


def read_config(path: Path) -> AdapterConfig:
    """Parse ``adapter_config.json`` into the config class of the method it names."""
    file = path / CONFIG_NAME
    if not file.is_file():
        subs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file()) if path.is_dir() else []
        hint = f" It has adapters in sub-folders: {', '.join(subs)}; pass adapter_name=" if subs else ""
        raise AdapterFileError(f"{file}: not found.{hint}" if path.is_dir() else f"{path}: no such adapter directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, found {type(data).__name__}")
    cls = config_class_for(data, str(file))
    return cls.from_dict(_drop_peft_defaults(data, file, cls), source=str(file))


# PEFT LoraConfig fields lorakit does not model, with the value that makes them a no-op.
PEFT_NOOP_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None, "lora_bias": False,
}
# Settings that only describe how the adapter was initialised or trained: safe to ignore when loading.
PEFT_INIT_ONLY = {"eva_config", "corda_config", "loftq_config", "lora_ga_config", "megatron_config", "megatron_core",
                  "qalora_group_size", "ensure_weight_tying", "kasa_config", "monteclora_config"}


def _drop_peft_defaults(data: dict, file: Path, cls: type) -> dict:
    """Remove PEFT fields that are at their no-op value; refuse ones that change the forward pass."""
    out = dict(data)
    own = {f.name for f in dataclasses.fields(cls)}
    for name, noop in PEFT_NOOP_FIELDS.items():
        if name not in out or name in own:
            continue
        value = out.pop(name)
        if value not in (noop, None) and name not in PEFT_INIT_ONLY:
            which = f" with method '{cls.method}'" if name == "target_parameters" else ""
            raise AdapterFileError(
                f"{file}: {name}={value!r} changes how the adapter computes, and lorakit does not support it{which} yet"
                + ("; parameter targets work with LoRA" if which else "")
            )
    return out


def read_tensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The flat tensor dict of an adapter directory."""
    safe, pickled = path / WEIGHTS_NAME, path / PICKLE_NAME
    if safe.is_file():
        try:
            return load_file(str(safe))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{safe}: unreadable or truncated safetensors file ({e}); save the adapter again") from None
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{pickled}: a pickle file, and unpickling can run arbitrary code. If you trust its source, pass "
                "allow_pickle=True (CLI: --allow-pickle), or convert it to safetensors"
            )
        return torch.load(str(pickled), map_location="cpu", weights_only=True)
    raise AdapterFileError(f"{path}: no {WEIGHTS_NAME} (or {PICKLE_NAME}) in the adapter directory")


def split_keys(flat: dict[str, torch.Tensor], config: AdapterConfig, source: str) -> AdapterState:
    """Group a flat PEFT tensor dict by module path into an AdapterState."""
    method = METHODS.get(config.method_name)
    names = sorted({n for c in method.adapter_classes for n in c.tensor_names}, key=len, reverse=True)
    state = AdapterState(config, {}, {}, {})
    for key, value in flat.items():
        if key.startswith("base_model.") and not key.startswith(PREFIX) and key.count(".") == 1:
            continue  # PEFT's model-level copy of buffers its layers share (RandLoRA, VeRA); each layer has its own
        rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = next((n for n in names if rel.endswith("." + n)), None)
        if name is not None:
            state.tensors.setdefault(rel[: -len(name) - 1], {})[name] = value
            continue
        parts = rel.split(".")
        owner = next((i for i in range(1, len(parts)) if is_module_to_save(".".join(parts[:i]), config.modules_to_save)), None)
        if owner is not None:
            inner = ".".join(parts[owner:])
            if inner.startswith(PEFT_WRAPPER_COPIES):
                continue  # peft's bias="all" also writes its wrapper's copies; the plain key holds the same tensor
            state.modules_to_save.setdefault(".".join(parts[:owner]), {})[inner] = value
        elif (config.bias != "none" and rel.endswith("bias")) or ".base_layer." in rel or _is_full_weight(rel):
            # trained biases, and embedding layers PEFT saves in full (save_embedding_layers)
            state.base_tensors[rel] = value
        elif (other := _other_kind_tensor(rel)) is not None:
            kinds = ", ".join(t.__name__ for t in method.layer_types)
            raise AdapterFileError(
                f"{source}: tensor '{key}' is a '{other}' tensor, which lorakit's '{method.name}' adapter does not "
                f"have: lorakit's '{method.name}' adapts {kinds} only, and this adapter was made for another layer kind"
            )
        else:
            raise AdapterFileError(f"{source}: tensor '{key}' belongs to no adapted module of method '{method.name}'")
    return state


def _other_kind_tensor(rel: str) -> Optional[str]:
    """The adapter tensor name ``rel`` ends with, among every registered method's (e.g. an embedding's DoRA)."""
    names = {n for m in METHODS.names() for c in METHODS.get(m).adapter_classes for n in c.tensor_names}
    return next((n for n in sorted(names, key=len, reverse=True) if rel.endswith("." + n)), None)


def _is_full_weight(rel: str) -> bool:
    # an untargeted embedding or head saved in full after a vocabulary resize: ``<module path>.weight``
    return rel.endswith(".weight") and not any(part.startswith("lora_") for part in rel.split("."))


def load_state(path: PathLike, adapter_name: Optional[str] = None, allow_pickle: bool = False) -> AdapterState:
    """Read a PEFT adapter directory into an AdapterState (no model needed)."""
    path = Path(path) / adapter_name if adapter_name else Path(path)
    config = read_config(path)
    state = split_keys(read_tensors(path, allow_pickle), config, str(path))
    check_ranks(state, str(path))
    return state


def check_ranks(state: AdapterState, source: str) -> None:
    """Refuse a LoRA/DoRA adapter whose factors do not have the rank its config gives their module."""
    if state.config.method_name not in ("lora", "dora"):
        return
    for path, tensors in state.tensors.items():
        r = state.module_config(path).r
        a = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
        b = tensors.get("lora_B.weight", tensors.get("lora_embedding_B"))
        if a is None or b is None:
            raise AdapterFileError(f"{source}: module '{path}' has tensors {sorted(tensors)}, not both LoRA factors")
        ranks = (a.shape[0], b.shape[1])
        if state.config.target_parameters and ranks[0] == ranks[1] and r > 0 and ranks[0] % r == 0:
            continue  # a parameter adapter stacks r ranks per expert (target_parameters)
        if ranks != (r, r):
            raise AdapterFileError(
                f"{source}: module '{path}': {CONFIG_NAME} gives rank {r}, the tensors have rank "
                f"{ranks[0] if ranks[0] == ranks[1] else ranks} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}); "
                "the config does not describe these weights"
            )


def read_base(path: PathLike, adapter_name: Optional[str] = None) -> Optional[dict]:
    """The base model record saved beside an adapter (``lorakit_base.json``), or None when there is none."""
    file = (Path(path) / adapter_name if adapter_name else Path(path)) / BASE_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or not {"fingerprint", "architecture", "shapes", "values"} <= set(data):
        raise AdapterFileError(f"{file}: not a lorakit base record; delete it to load the adapter unchecked")
    return data


def _flat(state: AdapterState) -> dict[str, torch.Tensor]:
    flat = {}
    for group in (state.tensors, state.modules_to_save):
        for path, tensors in group.items():
            flat.update({f"{PREFIX}{path}.{k}": v for k, v in tensors.items()})
    flat.update({f"{PREFIX}{k}": v for k, v in state.base_tensors.items()})
    # PEFT also writes one model-level copy of the buffers its layers share (RandLoRA's bases), as base_model.<name>
    shared = {n for c in METHODS.get(state.config.method_name).adapter_classes for n in getattr(c, "shared_tensor_names", ())}
    for name in sorted(shared):
        first = next((t[name] for _, t in sorted(state.tensors.items()) if name in t), None)
        if first is not None:
            flat[f"base_model.{name}"] = first
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}


def _json_ready(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


def save_state(state: AdapterState, path: PathLike, adapter_name: Optional[str] = None,
               base: Optional[dict] = None) -> Path:
    """Write ``state`` as a PEFT directory (atomically) and return its path; ``base``: the base model's record."""
    target = (Path(path) / adapter_name if adapter_name else Path(path)).resolve()
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target}: exists and is not a directory; choose another path for the adapter")
    data = {k: _json_ready(v) for k, v in state.config.to_dict().items()}
    data["inference_mode"] = True
    data.setdefault("peft_version", "0.21.2")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the final files (same filesystem, so the renames below cannot half-happen).
    tmp = Path(tempfile.mkdtemp(prefix=".lorakit-save-", dir=target if target.is_dir() else target.parent))
    try:
        save_file(_flat(state), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if base is not None:
            (tmp / BASE_NAME).write_text(json.dumps(base) + "\n")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # the folders made for this save, so that a failed save leaves no trace
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the written files to ``target``, keeping whatever else an existing directory holds."""
    if not target.exists():
        os.replace(tmp, target)  # a new directory appears whole or not at all
        return
    # An existing directory may hold other adapters in sub-folders, a README or the user's own files: only the
    # adapter's files are replaced, each by an atomic rename (weights first, so the old config never describes
    # new weights for longer than one rename).
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.replace(tmp / name, target / name)
    if (tmp / BASE_NAME).exists():
        os.replace(tmp / BASE_NAME, target / BASE_NAME)
    else:  # the old base record describes the old adapter
        (target / BASE_NAME).unlink(missing_ok=True)
    (target / PICKLE_NAME).unlink(missing_ok=True)  # an older pickled copy of the weights is now stale
    tmp.rmdir()


def save_peft(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None,
              save_embedding_layers: Union[bool, str] = "auto") -> Path:
    """Save the adapter of ``model`` as a PEFT directory that ``peft.PeftModel.from_pretrained`` loads.

    ``save_embedding_layers`` is peft's: embedding weights go into the file when an embedding is targeted or the
    vocabulary was resized ("auto"), always (True) or never (False). ``adapter_name`` writes to that sub-folder.
    On a model with several adapters, ``adapter_name`` also picks the one to write; without it every adapter is
    written in PEFT's layout: ``"default"`` in ``path`` itself, each other one in ``path/<name>``.
    """
    names = adapter_names(model)
    if len(names) <= 1 or adapter_name is not None:
        return _save_one(model, path, adapter_name if len(names) > 1 else None, adapter_name, save_embedding_layers)
    for name in names:
        _save_one(model, path, name, None if name == DEFAULT else name, save_embedding_layers)
    return Path(path).resolve()


def _save_one(model: nn.Module, path: PathLike, adapter_name: Optional[str], folder: Optional[str],
              save_embedding_layers: Union[bool, str]) -> Path:
    state = AdapterState.from_model(model, adapter_name)
    if state.config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if name:
            state = state.replace(base_model_name_or_path=str(name))
    state.base_tensors.update(embedding_weights(model, state.config, save_embedding_layers))
    return save_state(state, path, folder, base=fingerprint.record(model))


def load_peft(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None, *, is_trainable: bool = False,
              allow_pickle: bool = False) -> nn.Module:
    """Apply the adapter saved at ``path`` (PEFT or lorakit) to ``model`` in place and return it.

    ``adapter_name`` reads ``path/<adapter_name>`` (PEFT's sub-folder), or ``path`` itself when that holds the
    only adapter, and names the adapter so on the model: a name the model has gets the new weights in place
    (``hotswap_adapter``), a new name is added beside the model's adapters (PEFT's ``load_adapter``).
    """
    folder = _located(path, adapter_name)
    state = load_state(path, folder, allow_pickle)
    fresh = not wrapped_modules(model)
    added = adapter_name is not None and adapter_name not in adapter_names(model)
    if state.base_tensors and not fresh and (added or len(adapter_names(model)) > 1):
        own = fingerprint.base_parameters(model)
        changed = sorted(k for k, v in state.base_tensors.items()
                         if not torch.equal(own.get(k.replace(".base_layer.", "."), torch.empty(0)).detach().cpu(), v))
        if changed:
            raise AdapterFileError(f"{path}: the adapter carries base weights that differ from the model's "
                                   f"({', '.join(changed[:3])}), which its other adapters share; load it into a "
                                   "model of its own")
        state.base_tensors.clear()  # PEFT saved the (unchanged) embeddings it adapts: nothing to copy
    carried = {k.replace(".base_layer.", ".") for k in state.base_tensors}  # weights the file brings in full
    problem = base_problem(model, read_base(path, folder), state.config.base_model_name_or_path, str(path),
                           carried)
    if problem is not None and problem[0] == "weights":
        raise AdapterFileError(problem[1])
    fingerprint.remember(model)
    with undone_on_error(model, adapter_name):
        state.load_into(model, adapter_name)  # other architectures or shapes: its errors name the module that does not fit
        if problem is not None:
            raise AdapterFileError(problem[1])
    several = len(adapter_names(model)) > 1
    set_trainable(model, is_trainable, selected(model, adapter_name, "load an adapter") if several else None)
    return model


def _located(path: PathLike, adapter_name: Optional[str]) -> Optional[str]:
    """The sub-folder to read: ``adapter_name``'s, unless only ``path`` itself holds an adapter (then None)."""
    if adapter_name and not (Path(path) / adapter_name / CONFIG_NAME).is_file() and (Path(path) / CONFIG_NAME).is_file():
        return None  # PEFT's from_pretrained(path, adapter_name=...): the directory itself, under that name
    return adapter_name


def hotswap_adapter(model: nn.Module, source: Union[PathLike, AdapterState], adapter_name: str = DEFAULT,
                    allow_pickle: bool = False) -> nn.Module:
    """Copy another adapter's weights into the model's adapter ``adapter_name`` in place (PEFT's hotswap_adapter).

    The parameters stay the same objects (a ``torch.compile``d model does not recompile); the new adapter must
    adapt the same modules with the same shapes and a config that computes alike (rank, alpha...), or it is refused.
    """
    check_name(model, adapter_name)
    state = source if isinstance(source, AdapterState) else load_state(source, _located(source, adapter_name),
                                                                       allow_pickle)
    return state.load_into(model, adapter_name)


def base_problem(model: nn.Module, recorded: Optional[dict], name: Optional[str], source: str,
                 carried: frozenset = frozenset()):
    """(what differs, message) when ``model`` is not the base the adapter records (``fingerprint.compare``'s
    kinds), or None (also when the adapter records no base); parameters in ``carried`` are not compared."""
    if recorded is None:
        return None
    ours = fingerprint.matching(model, recorded)
    if carried:
        recorded, ours = fingerprint.without(recorded, carried), fingerprint.without(ours, carried)
    found = fingerprint.compare(recorded, ours)
    if found is None:
        return None
    kind, diff = found
    return kind, (f"{source}: made for base model {name or recorded['architecture']} (fingerprint "
                  f"{recorded['fingerprint']}), but this model has fingerprint {ours['fingerprint']}: {diff}; load it "
                  "onto the base model it was trained on")


__all__ = ["AdapterFileError", "hotswap_adapter", "load_peft", "load_state", "save_peft", "save_state", "config_of"]
