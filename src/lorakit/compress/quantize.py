"""Quantised bases: a model's linear layers stored in 4 or 8 bits, adapters trained in float over them (QLoRA).

QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., arXiv:2305.14314). The forward of a quantised
layer is h = dequant(Q(W0)) x + b; an adapter adds its update in float, so LoRA trains over the frozen rounded W0.

``quantize_(model, QuantizeConfig(kind))`` replaces every ``nn.Linear`` but the output head (and classifier) in
place. Kinds, and what runs on a CPU-only torch 2.13 with bitsandbytes 0.50.2 and torchao 0.18.0:

- ``nf4``, ``fp4``: bitsandbytes ``Linear4bit``, block size 64, no double quantisation. These are the defaults of
  transformers' ``BitsAndBytesConfig(load_in_4bit=True)``, so the stored bytes equal ``from_pretrained`` with it.
- ``int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8, outlier threshold 6.0 as transformers); bitsandbytes casts
  the inputs to fp16 inside the matmul.
- ``torchao-int8``: torchao ``Int8WeightOnlyConfig`` (per-channel int8 weight, float activations).
- ``torchao-int4``: torchao ``Int4WeightOnlyConfig``; its kernels need CUDA (or the ``mslk`` package), so on a
  CPU build it is refused before the model is touched. For 4 bits on CPU use nf4/fp4.

Every kind is probed on a small layer first: a kind the machine cannot run raises ``QuantizationUnavailable``
and leaves the model untouched. ``quantize_`` sets ``is_loaded_in_4bit``/``is_loaded_in_8bit`` on the model as
transformers does, so PEFT's ``get_peft_model``/``PeftModel.from_pretrained`` use their bitsandbytes layers on it.

Merging into a quantised layer (``lorakit.merge``) does what PEFT does: dequantise, add ΔW, quantise again, with
a warning that rounding changes the outputs. ``dequantize_(model)`` turns the layers back into ``nn.Linear``
holding the rounded W0, into which a merge is exact. Methods that need W0 itself (its SVD, LDU or Nyström
factors, or base-rewriting initialisers) refuse a quantised layer (``Adapter.quantized_base``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..core.adapter import QUANTIZED_KINDS, quantized_kind
from ..core.targets import output_head_paths

BNB_KINDS = ("nf4", "fp4", "int8")
KINDS = BNB_KINDS + ("torchao-int8", "torchao-int4")
ROUNDING = "merging into a {} layer quantises W0 + ΔW again: outputs differ from the unmerged adapter by rounding"


class QuantizationUnavailable(ValueError):
    """A quantisation this machine (or its installed packages) cannot run."""


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Which quantisation, the float dtype it computes in, and the dtype of the layers it leaves dense."""

    kind: str = "nf4"
    compute_dtype: torch.dtype = torch.float32
    dtype: Optional[torch.dtype] = None  # cast the remaining float parameters (embeddings, norms) to this
    skip: tuple = ()  # module-path suffixes left dense besides the output head

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantisation {self.kind!r} is not one lorakit knows; choose one of {', '.join(KINDS)}")


@contextlib.contextmanager
def _quiet_import():
    """Silence the warnings bitsandbytes and torchao log while importing (optional GPU kernels they cannot load)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _bnb():
    try:
        with _quiet_import():
            import bitsandbytes
    except ImportError:
        raise QuantizationUnavailable(
            "bitsandbytes is not installed: pip install 'bitsandbytes>=0.48' (or lorakit[quantize])"
        ) from None
    return bitsandbytes


def _torchao():
    try:
        with _quiet_import():
            import torchao.quantization as q
    except ImportError:
        raise QuantizationUnavailable("torchao is not installed: pip install 'torchao>=0.14' (or lorakit[quantize])") from None
    return q


def _quantized_linear(linear: nn.Linear, config: QuantizeConfig) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight and bias, quantised on its device."""
    bnb = _bnb()
    w, device = linear.weight.data, linear.weight.device
    bias = linear.bias is not None
    if config.kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=config.compute_dtype,
                                  compress_statistics=False, quant_type=config.kind, device="meta")
        layer.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, blocksize=64, compress_statistics=False,
                                         quant_type=config.kind, module=layer)
        # bitsandbytes on an AVX512-BF16 CPU repacks a 4-bit weight in place at its first eval forward, then computes
        # in bf16 with absmax rounded to bf16: eval outputs would differ from training ones by ~1e-3 and the stored
        # weight would change. Layers made here keep the float path (dequantise, then matmul) in both modes.
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(config.compute_dtype if config.kind != "int8" else w.dtype),
                                  requires_grad=False)
    return layer.to(device).train(linear.training)  # bitsandbytes quantises as the parameter moves to its device


def _torchao_config(kind: str) -> Any:
    q = _torchao()
    return q.Int8WeightOnlyConfig() if kind == "torchao-int8" else q.Int4WeightOnlyConfig(group_size=128)


def _run_small(config: QuantizeConfig) -> None:
    """Quantise one small layer and run it; whatever the backend raises propagates."""
    layer = nn.Linear(256, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config.kind in BNB_KINDS:
            out = _quantized_linear(layer, config)(torch.randn(2, 256))
        else:
            box = nn.Sequential(layer)
            _torchao().quantize_(box, _torchao_config(config.kind))
            if not _torchao_weight(box[0]):
                raise RuntimeError("torchao left the weight unquantised")
            out = box(torch.randn(2, 256))
    if not torch.isfinite(out).all():
        raise RuntimeError("the quantised layer returned NaN or inf")


def available() -> list[str]:
    """The quantisation kinds this machine runs (each probed on a small layer)."""
    out = []
    for kind in KINDS:
        try:
            _run_small(QuantizeConfig(kind))
            out.append(kind)
        except Exception:
            pass
    return out


def check_available(config: QuantizeConfig) -> None:
    """Raise QuantizationUnavailable, naming what does run here, if this machine cannot run ``config``."""
    try:
        _run_small(config)
    except QuantizationUnavailable:
        raise
    except Exception as e:  # whatever the backend raises, the user's answer is the same
        hint = " For 4 bits on CPU use nf4 or fp4 (bitsandbytes)." if config.kind == "torchao-int4" else ""
        first = str(e).splitlines()[0] if str(e) else "no message"
        raise QuantizationUnavailable(
            f"quantisation {config.kind!r} does not run on this machine ({type(e).__name__}: {first}).{hint} "
            f"Runnable here: {', '.join(available()) or 'none'}"
        ) from None


def _targets(model: nn.Module, config: QuantizeConfig) -> list[str]:
    heads = output_head_paths(model, "SEQ_CLS")  # the LM head, or a classifier's score/classifier: kept dense
    return [
        p for p, m in model.named_modules()
        if type(m) is nn.Linear and not any(p == h or p.startswith(h + ".") for h in heads)
        and not any(p == s or p.endswith("." + s) for s in config.skip)
    ]


def quantize_(model: nn.Module, config: QuantizeConfig | str = "nf4") -> nn.Module:
    """Quantise the linear layers of ``model`` in place (output head kept dense) and return it."""
    config = QuantizeConfig(config) if isinstance(config, str) else config
    if any(quantized_kind(m) is not None for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantised; quantise the unquantised model once")
    check_available(config)  # before touching the model: a kind that cannot run leaves it as it was
    paths = _targets(model, config)
    if not paths:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantise (besides the output head)")
    if config.dtype is not None:
        model.to(config.dtype)
    if config.kind.startswith("torchao"):
        wanted = set(paths)
        _torchao().quantize_(model, _torchao_config(config.kind), filter_fn=lambda m, fqn: fqn in wanted)
        for path in paths:
            model.get_submodule(path).lorakit_quantization = config.kind
    else:
        for path in paths:
            parent, _, child = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, _quantized_linear(getattr(owner, child), config))
        setattr(model, "is_loaded_in_8bit" if config.kind == "int8" else "is_loaded_in_4bit", True)
    model.lorakit_quantization = config.kind
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every quantised linear layer by an ``nn.Linear`` holding its dequantised (rounded) weight."""
    for path, module in list(model.named_modules()):
        kind = quantized_kind(module)
        if kind is None or not path:
            continue
        out_f, in_f = kind.features(module)
        weight = kind.dequantize(module).detach()
        dense = nn.Linear(in_f, out_f, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias.detach())
        dense.requires_grad_(False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "lorakit_quantization"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def _torchao_weight(layer: nn.Module) -> bool:
    ao = sys.modules.get("torchao.utils")
    return ao is not None and isinstance(getattr(layer, "weight", None), ao.TorchAOBaseTensor)


def _warn_rounding(name: str, path: str) -> None:
    warnings.warn(f"module '{path}': " + ROUNDING.format(name), UserWarning, stacklevel=4)


class Bnb4bit:
    """bitsandbytes ``Linear4bit`` (nf4 or fp4)."""

    name = "bitsandbytes 4-bit"

    def matches(self, layer: nn.Module) -> bool:
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)

    def features(self, layer: nn.Module) -> tuple[int, int]:
        return layer.out_features, layer.in_features

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.compute_dtype or torch.float32

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as F

        w, state = layer.weight, layer.weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return F.dequantize_4bit(w.data, state)
        # bitsandbytes' CPU inference layout (an eval forward on an AVX512-BF16 CPU repacks the weight in place and
        # rounds absmax to bf16): undo the packing on a copy of the state; absmax is the bf16 one the layer now uses
        data, unpacked = F._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(state))
        if not unpacked.nested:
            unpacked.absmax = state.absmax.T.reshape(-1).to(unpacked.dtype)
        return F.dequantize_4bit(data, unpacked)

    def merge(self, layer: nn.Module, delta: torch.Tensor, path: str) -> nn.Module:
        import bitsandbytes as bnb

        _warn_rounding(f"{layer.weight.quant_type} 4-bit", path)
        w = layer.weight
        dense = self.dequantize(layer)
        merged = dense + delta.to(dense.dtype)
        layer.weight = bnb.nn.Params4bit(merged.to("cpu"), requires_grad=False, blocksize=w.blocksize,
                                         compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                         quant_storage=w.quant_storage, module=layer).to(w.device)
        return layer


class Bnb8bit:
    """bitsandbytes ``Linear8bitLt`` (LLM.int8)."""

    name = "bitsandbytes int8"

    def matches(self, layer: nn.Module) -> bool:
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt)

    def features(self, layer: nn.Module) -> tuple[int, int]:
        return layer.out_features, layer.in_features

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return torch.float32

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb.to(layer.weight.device))

    def merge(self, layer: nn.Module, delta: torch.Tensor, path: str) -> nn.Module:
        import bitsandbytes as bnb

        _warn_rounding("int8", path)
        merged = self.dequantize(layer) + delta.float()
        device = layer.weight.device
        layer.weight = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        layer.state.reset_grads()
        layer.state.SCB = None
        return layer


class TorchaoWeightOnly:
    """An ``nn.Linear`` whose weight is a torchao quantised tensor."""

    name = "torchao"

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear) and _torchao_weight(layer)

    def features(self, layer: nn.Module) -> tuple[int, int]:
        return layer.out_features, layer.in_features

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.weight.dtype

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.dequantize()

    def merge(self, layer: nn.Module, delta: torch.Tensor, path: str) -> nn.Module:
        kind = getattr(layer, "lorakit_quantization", None)
        if kind is None:  # as PEFT without get_apply_tensor_subclass: no way to quantise the sum the same way
            raise ValueError(
                f"module '{path}': its torchao weight was not quantised by lorakit.compress.quantize_, so the merged "
                "weight cannot be quantised the same way; dequantize_(model) first for an exact dense merge"
            )
        _warn_rounding(kind, path)
        merged = self.dequantize(layer) + delta.to(layer.weight.dtype)
        layer.weight = nn.Parameter(merged, requires_grad=False)
        _torchao().quantize_(nn.Sequential(layer), _torchao_config(kind))
        return layer


QUANTIZED_KINDS.extend([Bnb4bit(), Bnb8bit(), TorchaoWeightOnly()])
