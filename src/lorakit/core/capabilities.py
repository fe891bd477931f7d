"""What a method's update allows, declared on each adapter class and checked against its forward.

Every path that treats an adapter as a fixed update asks the declaration (``require``) before it touches tensors:
``lorakit.merge`` asks ``mergeable``; ``AdapterState.to_lora``, ``lorakit.merging`` (concatenation included) and
routed experts built from adapters ask ``exportable_to_lora``; the server asks ``servable``; factor-wise federated
strategies ask ``aggregatable``. ``lorakit.testing.check_method`` checks each declaration against the method's
forward on several inputs, so a method that claims a capability it lacks fails the conformance suite.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

WHY = {
    "mergeable": "its update is input-dependent, so no single weight holds it",
    "exportable_to_lora": "its update is not exactly s·B·A",
    "servable": "the server applies exact s·B·A updates only",
    "aggregatable": "its tensors have no exact low-rank form as one LoRA pair (A, B) with ΔW = s·B·A",
}
WHAT_TO_DO = {
    "mergeable": "keep the adapter on the model (or unwrap(model) to remove it)",
    "exportable_to_lora": "keep it in its own format (save_peft), or merge it into the base weights if it is mergeable",
    "servable": "merge it into the base model (lorakit.merge) and serve that, or run it with the model directly",
    "aggregatable": "use strategy 'fedit' (key-wise average of the adapter tensors) instead",
}


@dataclass(frozen=True)
class Capabilities:
    """A method's declared capabilities; each implied one must hold too (export needs merge, etc.)."""

    mergeable: bool = False  # forward adds one ΔW (``delta``) whatever the input: merging into the weight is exact
    exportable_to_lora: bool = False  # ΔW = s·B·A exactly (``low_rank``): LoRA export, merging, concatenation
    servable: bool = False  # the server's per-token s·B·A kernels reproduce forward (linear layers)
    aggregatable: bool = False  # the tensors are the LoRA pair of ``low_rank``: factor-wise federated strategies

    def __post_init__(self) -> None:
        needs = {"exportable_to_lora": "mergeable", "servable": "exportable_to_lora", "aggregatable": "exportable_to_lora"}
        for cap, needed in needs.items():
            if getattr(self, cap) and not getattr(self, needed):
                raise ValueError(f"Capabilities: {cap}=True needs {needed}=True (a {cap} update is a {needed} one)")

    def names(self) -> list[str]:
        """The capabilities declared True."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


NONE = Capabilities()
MERGE_ONLY = Capabilities(mergeable=True)
LOW_RANK = Capabilities(mergeable=True, exportable_to_lora=True, servable=True)
LORA_PAIR = Capabilities(mergeable=True, exportable_to_lora=True, servable=True, aggregatable=True)


class CapabilityError(TypeError, ValueError):
    """An operation needs a capability that the adapter's method does not declare."""


def require(capabilities: Capabilities | None, capability: str, method: str, doing: str) -> None:
    """Raise CapabilityError unless ``capability`` is declared; the message names the method and what to do."""
    if capabilities is not None and getattr(capabilities, capability):
        return
    why = ("declares no capabilities" if capabilities is None else
           f"does not declare '{capability}' (declared: {', '.join(capabilities.names()) or 'none'})")
    raise CapabilityError(f"cannot {doing}: method '{method}' {why}: {WHY[capability]}; {WHAT_TO_DO[capability]}")
