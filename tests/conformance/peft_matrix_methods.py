"""The methods of the PEFT conformance matrix: each builds the same adapter in lorakit and in the installed peft.

A method gives ``lorakit(base, targets, conv1d, batches)`` and ``peft(base, targets, conv1d, batches)``, each
returning a model with the adapter applied (and, for the data-driven initialisers, initialised on ``batches``).
The LoRA family goes through the initialiser tests' helpers (``tests/init/init_helpers.py``).
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "init"))
from init_helpers import lorakit_model, peft_model  # noqa: E402

R, ALPHA = 4, 8


@dataclass(frozen=True)
class Method:
    """One matrix column: how lorakit and peft build the adapter (``base`` is copied, never changed)."""

    name: str
    lorakit: Callable
    peft: Callable


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on defaults (eva_config, fan_in_fan_out) are expected
        return fn(*args, **kwargs)


def _rows(layer_input, model_input, layer_name):
    """Every input row of a layer (peft's default selects token positions, and assumes [batch, tokens, dim])."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1]).contiguous()  # peft hashes it with view(-1)


def _eva_peft(model, batches):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    # classifiers (one label per example, e.g. BERT's pooler sees [batch, dim]): every input row counts
    per_example = batches[0]["labels"].dim() == 1
    extra = dict(prepare_model_inputs_fn=None, prepare_layer_inputs_fn=_rows) if per_example else {}
    _quiet(initialize_lora_eva_weights, model, batches, show_progress_bar=False, **extra)
    return model


def _lora_family(init=True, **extra) -> Method:
    def ours(base, targets, conv1d, batches):
        data = batches if init in ("lora_ga", "eva") else None
        return lorakit_model(base, init, R, ALPHA, targets, data, **extra)

    def theirs(base, targets, conv1d, batches):
        kwargs = dict(extra)
        if init == "eva":
            from peft.tuners.lora.config import EvaConfig

            kwargs["eva_config"] = EvaConfig(use_label_mask=False)  # labels are class ids for some models
        model = _quiet(peft_model, base, init, R, ALPHA, targets, batches if init == "lora_ga" else None,
                       fan_in_fan_out=conv1d, **kwargs)
        return _eva_peft(model, batches) if init == "eva" else model

    return Method("", ours, theirs)


def _named(name: str, method: Method) -> Method:
    return Method(name, method.lorakit, method.peft)


def _bone_peft(base, targets, conv1d, batches):
    from peft import MissConfig, get_peft_model

    return _quiet(get_peft_model, copy.deepcopy(base), MissConfig(r=R, target_modules=list(targets)))


def _shira_peft(base, targets, conv1d, batches):
    from peft import ShiraConfig, get_peft_model

    config = ShiraConfig(r=2, random_seed=7, target_modules=list(targets), fan_in_fan_out=conv1d)
    return _quiet(get_peft_model, copy.deepcopy(base), config)


def _randlora_peft(base, targets, conv1d, batches):
    from peft import RandLoraConfig, get_peft_model

    config = RandLoraConfig(r=R, randlora_alpha=ALPHA, projection_prng_key=3, target_modules=list(targets),
                            fan_in_fan_out=conv1d)  # save_projection: peft's default (True), bases in the file
    return _quiet(get_peft_model, copy.deepcopy(base), config)


def _ffa_peft(base, targets, conv1d, batches):
    """PEFT has no FFA-LoRA: its users freeze ``lora_A`` of a plain LoRA, which is what this builds."""
    model = _quiet(peft_model, base, True, R, ALPHA, targets, None, fan_in_fan_out=conv1d)
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
    return model


def _apply(config_fn):
    def ours(base, targets, conv1d, batches):
        return lorakit.apply(copy.deepcopy(base), config_fn(list(targets)))

    return ours


METHODS: dict[str, Method] = {m.name: m for m in (
    _named("lora", _lora_family()),
    _named("rslora", _lora_family(use_rslora=True)),
    _named("dora", _lora_family(use_dora=True)),
    _named("pissa", _lora_family("pissa")),
    _named("olora", _lora_family("olora")),
    _named("orthogonal", _lora_family("orthogonal")),
    _named("lora_ga", _lora_family("lora_ga")),
    _named("eva", _lora_family("eva")),
    Method("bone", _apply(lambda t: lorakit.METHODS.get("bone").config_class(r=R, target_modules=t)), _bone_peft),
    Method("shira", _apply(lambda t: lorakit.METHODS.get("shira").config_class(r=2, random_seed=7, target_modules=t)),
           _shira_peft),
    Method("randlora", _apply(lambda t: lorakit.METHODS.get("randlora").config_class(
        r=R, randlora_alpha=ALPHA, projection_prng_key=3, target_modules=t)), _randlora_peft),
    Method("ffa_lora", _apply(lambda t: lorakit.METHODS.get("ffa_lora").config_class(r=R, lora_alpha=ALPHA, target_modules=t)),
           _ffa_peft),
)}
