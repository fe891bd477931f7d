"""Which modules an adapter config targets: PEFT's matching rules, with errors that help.

``target_modules``: a string is a regex fully matched against the module path; a list matches a path that
equals an entry or ends with ``"." + entry``; ``"all-linear"`` means every Linear/Conv1D except the output
head, by PEFT's rule (``expand_all_linear``). ``exclude_modules`` likewise; ``modules_to_save`` (and what lies inside them) are never targets.
``layers_to_transform`` keeps modules whose layer index (the first number after ``layers_pattern``, or after
any segment when it is unset) is listed; a full path named in a list is kept whatever its layer.
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

from .config import AdapterConfig

try:
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D

    LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
except ImportError:  # pragma: no cover
    LINEAR_TYPES, PreTrainedModel = (nn.Linear,), None


def matches(path: str, spec: Union[str, list, None]) -> bool:
    """PEFT's rule for one module path against a ``target_modules``/``exclude_modules`` value."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def layer_index(path: str, layers_pattern: Union[str, list, None]) -> Optional[int]:
    """The transformer block index in ``path``, as PEFT finds it for ``layers_to_transform``."""
    # Lazy ``.*?``: the first numbered segment is the block; later ones are nested (e.g. MoE experts).
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = None
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
            if found:
                break
    return int(found.group(1)) if found else None


SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's names for a classification head, in its order


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is module)


def token_embeddings(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """(input, output) token embeddings of a transformers model; None for each it lacks (vision backbones raise)."""
    def get(name):
        try:
            return getattr(model, name)() if hasattr(model, name) else None
        except NotImplementedError:  # transformers' models without token embeddings (ResNet, ...)
            return None
    return get("get_input_embeddings"), get("get_output_embeddings")


def output_head_paths(model: nn.Module, task_type: Optional[str] = None) -> set[str]:
    """The output head that ``all-linear`` leaves out, by PEFT's rule.

    A transformers model's output embeddings (``get_output_embeddings()``: the LM head); if it has none and
    ``task_type`` is SEQ_CLS, its ``score`` or else ``classifier`` module. Nothing otherwise: an image or
    sequence classifier without that task type, and any model that is not a transformers ``PreTrainedModel``,
    keep their heads among the targets, as in PEFT.
    """
    if PreTrainedModel is None or not isinstance(model, PreTrainedModel):
        return set()
    head = token_embeddings(model)[1]
    if head is not None:
        return {_path_of(model, head)}
    if task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEADS:
            head = getattr(model, name, None)
            if head is not None:
                return {_path_of(model, head)}
    return set()


def expand_all_linear(model: nn.Module, config: AdapterConfig) -> list:
    """``all-linear`` as PEFT expands it: the full paths of every Linear/Conv1D except the output head module.

    Only the head module itself is left out (a head that is a container, e.g. RoBERTa's ``classifier``, keeps
    its inner layers among the targets, as in PEFT); ``modules_to_save`` are skipped later by ``is_target``.
    """
    skip = output_head_paths(model, config.task_type)
    return sorted(p for p, m in model.named_modules() if p and isinstance(m, LINEAR_TYPES) and p not in skip)


def is_module_to_save(path: str, names: Optional[list]) -> bool:
    """PEFT's rule for wrapping a module in full: a plain suffix (``classifier`` also takes ``pre_classifier``)."""
    return bool(path) and any(path.endswith(n) for n in names or [])


def is_saved_in_full(path: str, modules_to_save: Optional[list]) -> bool:
    """Whether ``path`` is, or lies inside, a ``modules_to_save`` entry (PEFT's regex rule)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save or [])


def is_target(path: str, config: AdapterConfig) -> bool:
    """Whether ``config`` puts an adapter on the module at ``path``."""
    if not matches(path, config.target_modules) or matches(path, config.exclude_modules):
        return False
    if is_saved_in_full(path, config.modules_to_save):
        return False  # as PEFT: a module trained in full (or inside one) never also gets an adapter
    if config.layers_to_transform is None or config.layers_to_transform == []:
        return True
    if not isinstance(config.target_modules, str) and path in config.target_modules:
        return True  # as PEFT: a full path named in the list is taken whatever its layer
    index = layer_index(path, config.layers_pattern)
    if index is None:
        return False
    wanted = config.layers_to_transform
    return index == wanted if isinstance(wanted, int) else index in wanted


def no_match_message(model: nn.Module, config: AdapterConfig) -> str:
    """The error text when nothing matches: the nearest module names, and what to pass."""
    paths = [p for p, _ in model.named_modules() if p]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    asked = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules or [])
    near = sorted({n for t in asked for n in difflib.get_close_matches(str(t), leaves, n=4, cutoff=0.3)})
    layers = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LINEAR_TYPES + (nn.Embedding, nn.Conv2d))})
    return (
        f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}"
        + (f" (with layers_to_transform={config.layers_to_transform!r})" if config.layers_to_transform is not None else "")
        + f". Nearest names: {', '.join(near) or '(none)'}. Adaptable layers in this model: {', '.join(layers[:30])}"
    )


def parameter_targets(model: nn.Module, config: AdapterConfig) -> dict[str, list[str]]:
    """PEFT's ``target_parameters`` rule: module path -> names of its own parameters targeted, in its order.

    A parameter matches when ``<module path>.<name>`` equals an entry or ends with ``"." + entry``. Within one
    module the parameters keep the module's order, which is the order PEFT nests its wrappers in (the first is
    innermost). Parameters of the top-level module itself are refused, as in PEFT.
    """
    wanted = sorted(getattr(config, "target_parameters", None) or [])
    out: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            if key in wanted or any(key.endswith("." + t) for t in wanted):
                if not path:
                    raise ValueError(f"target_parameters: '{name}' is a parameter of the top-level module "
                                     f"{type(model).__name__}; only parameters of its sub-modules can be adapted")
                out.setdefault(path, []).append(name)
    if wanted and not out:
        raise ValueError(f"target_parameters={wanted} matches no parameter of {type(model).__name__}; parameters "
                         "are named '<module path>.<name>', e.g. 'mlp.experts.gate_up_proj'")
    return out
