"""Which base embedding weights a PEFT adapter file carries in full (PEFT's ``save_embedding_layers`` rule).

PEFT saves the input/output embeddings' base weights when an embedding layer is targeted, or, with "auto", when
the vocabulary was resized against the base model's ``config.json``, so the adapter reloads on a fresh base.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Union

from torch import nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.targets import token_embeddings

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # what peft's save_embedding_layers="auto" looks for


def _embedding_targeted(model: nn.Module, config: AdapterConfig) -> bool:
    """peft's test: an embedding layer name in target_modules (a list), or a module of that name it matches (a regex)."""
    targets = config.target_modules
    if isinstance(targets, str):
        names = "|".join(EMBEDDING_LAYER_NAMES)
        return any(re.fullmatch(targets, p) for p, _ in model.named_modules() if re.match(rf"(.*\.)?({names})$", p))
    return any(n in (targets or []) for n in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, config: AdapterConfig) -> bool:
    """Whether the model's vocabulary differs from its base model's config.json (a local directory, as offline)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    file = Path(base) / "config.json" if base else None
    if not vocab or file is None or not file.is_file():
        return False
    return json.loads(file.read_text()).get("vocab_size", vocab) != vocab


def embedding_weights(model: nn.Module, config: AdapterConfig, save_embedding_layers: Union[bool, str] = "auto") -> dict:
    """The embedding weights that peft's ``save_embedding_layers`` rule writes in full, keyed by parameter name.

    ``"auto"``: when an embedding layer is targeted, the targeted input/output embeddings' base weights; else,
    when the vocabulary was resized (against the base model's config.json), the input and output embeddings.
    """
    if save_embedding_layers is False:
        return {}
    layers = token_embeddings(model)
    targeted = _embedding_targeted(model, config)
    if save_embedding_layers == "auto" and not targeted and not _vocab_resized(model, config):
        return {}
    paths = {id(m): p for p, m in model.named_modules()}
    out = {}
    for layer in layers:
        if layer is None or id(layer) not in paths or (targeted and not isinstance(layer, Adapter)):
            continue  # as peft: once an embedding is targeted, only the wrapped ones are saved
        base = layer.base_layer if isinstance(layer, Adapter) else layer
        key = f"{paths[id(layer)]}.base_layer.weight" if isinstance(layer, Adapter) else f"{paths[id(layer)]}.weight"
        out[key] = base.weight.detach().cpu().clone()
    return out
