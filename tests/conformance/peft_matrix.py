"""The PEFT conformance matrix: architecture x layer kind x method x direction x check, against peft 0.21.2.

A *scenario* (architecture, layer kind, method, direction) builds one adapter with one library, perturbs its
trainable tensors (standing in for training), saves it, and loads the file with the other library:
``lk2peft`` is lorakit -> ``peft.PeftModel.from_pretrained``; ``peft2lk`` is peft -> ``lorakit.load_peft``.
It then runs the three *checks* of its cells:

- ``forward``: the loaded model's logits equal the source model's (fp32, atol/rtol 1e-4 on O(1) logits); for
  ``peft2lk``, peft's own load of the same file (the file is the contract: see ``PEFT_ROUNDTRIP``);
- ``merge``: lorakit's ``merge`` and peft's ``merge_and_unload`` give the same weights (every key of the plain
  model) and logits, equal to the unmerged adapter's logits;
- ``files``: the loading library saves the adapter again, and the two directories hold the same tensor keys,
  shapes and values and the same ``adapter_config.json`` fields (those both files write; version stamps,
  ``base_model_name_or_path`` and ``inference_mode`` aside).

A cell's expectation (``expected``) is ``match``; ``unsupported`` where lorakit refuses the combination (the
cell checks the error's type and message); or ``peft-unsupported`` where peft has no such adapter (the cell
checks that peft refuses, so it flips when peft adds it). Known lorakit defects are strict xfails that name
the defect (``DEFECTS``), so they pass once fixed.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

import lorakit
from peft_matrix_methods import METHODS
from peft_matrix_models import ARCHS, LAYERS, perturb_

DIRECTIONS = ("lk2peft", "peft2lk")
CHECKS = ("forward", "merge", "files")
ATOL = RTOL = 1e-4
FILE_ATOL = 1e-6
DATA_DRIVEN = ("lora_ga", "eva")
# adapter_config.json fields that are stamps rather than adapter settings
CONFIG_STAMPS = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "task_type"}

INITIALISERS = ("pissa", "olora", "orthogonal", "lora_ga", "eva")
# The layer kinds lorakit adapts, per matrix method, and the error it raises for the others.
LORAKIT_LAYERS = {"lora": LAYERS, "rslora": LAYERS, "dora": ("Linear", "Conv1D"), "bone": ("Linear",),
                  "shira": ("Linear", "Conv1D"), "randlora": ("Linear", "Conv1D"), "ffa_lora": ("Linear", "Conv1D"),
                  **{i: ("Linear", "Conv1D") for i in INITIALISERS}}
LAYER_REFUSAL = (TypeError, r"module '.+' is a \w+; method '\w+' adapts .*Narrow target_modules")
INIT_REFUSAL = (ValueError, r"init_lora_weights='\w+' initialises LoRA/DoRA factors on Linear/Conv1D layers")
TIED_REFUSAL = r"its weight is shared with .+ \(tied weights\), so merging its update would change those too"
TIED_REFUSED = "lorakit refused to merge into tied weights"
LOAD_REFUSAL = (ValueError, r"tensor '.+' is a '\w+' tensor, which lorakit's '\w+' adapter does not have")
# peft files lorakit loads although it cannot make the adapter itself: EVA does nothing to embeddings in peft
# (a plain LoRA), and peft's "FFA-LoRA" is a plain LoRA whose lora_A the user froze.
LOADS_FROM_PEFT = {("eva", "Embedding"), ("ffa_lora", "Embedding"), ("ffa_lora", "Conv2d")}
# The layer kinds peft 0.21.2 adapts with each method (MiSS and SHiRA: nn.Linear only; its OLoRA ignores
# fan_in_fan_out, so on Conv1D its own model fails).
PEFT_LAYERS = {"bone": ("Linear",), "shira": ("Linear",), "randlora": ("Linear", "Conv1D"), "olora": ("Linear",)}
# Rows whose targeted weight the output head shares: merging into it is refused.
TIED = {("tied", "Linear"), ("tied", "Embedding"), ("gpt2", "Embedding"), ("bart", "Embedding")}

# What the page says about cells that are not plain lorakit-vs-peft comparisons.
NOTES = (
    "n/a (peft): peft 0.21.2 adapts nn.Linear only with MiSS (lorakit `bone`) and SHiRA; its OLoRA ignores "
    "fan_in_fan_out, so on GPT-2's Conv1D it builds A with the wrong shape and its own forward fails",
    "unsupported, peft → lorakit: lorakit refuses peft's file of that adapter (DoRA on embeddings by the tensor it "
    "does not have; PiSSA/OLoRA/orthogonal files because loading re-runs the initialiser); peft's EVA files on "
    "embeddings and plain-LoRA files with a frozen lora_A (its users' FFA-LoRA) are plain LoRA, and load",
    "LoRA-GA moves the base weight and is not re-run on load: both directions load onto the moved base weights",
    "FFA-LoRA, peft → lorakit: peft's LoRA with lora_A frozen and only lora_B trained, loaded as plain LoRA",
)

# scenario id -> how peft's own load of its file differs from the peft model that wrote it (peft's business;
# the page lists them, since the peft -> lorakit cells compare with peft's load of the file)
PEFT_ROUNDTRIP: dict[str, str] = {}

# Known lorakit defects, by name: the cells that show one are strict xfails (none open today: the scaled
# embeddings of Gemma 3 and BART and the embeddings peft saves in full were fixed, and flipped their cells).
DEFECTS: dict[str, str] = {}


@dataclass(frozen=True)
class Cell:
    """One matrix cell and what it is expected to do."""

    arch: str
    layer: str
    method: str
    direction: str
    check: str
    expected: str = "match"  # or "unsupported" / "peft-unsupported"
    defect: Optional[str] = None  # known lorakit defects this cell shows (a strict xfail)
    fast: bool = False

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.layer}-{self.method}-{self.direction}-{self.check}"


def expectation(arch: str, layer: str, method: str, direction: str, check: str) -> tuple[str, Optional[str]]:
    """(expected outcome, known defects or None) of a cell."""
    if layer not in LORAKIT_LAYERS[method] and not (direction == "peft2lk" and (method, layer) in LOADS_FROM_PEFT):
        return "unsupported", None
    if layer not in PEFT_LAYERS.get(method, LAYERS):
        return "peft-unsupported", None
    if (arch, layer) in TIED and check == "merge":
        # merging into a weight the output head shares would change the head too (peft does, and its merged
        # model then differs from its adapter's): lorakit refuses, naming the tied weights
        return "tied-refused", known_defect(arch, layer, method, direction, check)
    return "match", known_defect(arch, layer, method, direction, check)


def known_defect(arch: str, layer: str, method: str, direction: str, check: str) -> Optional[str]:
    """The known lorakit defects (names in ``DEFECTS``) that make this cell differ from peft, if any."""
    return None


FAST = {  # one scenario per method and per architecture (all three checks of each), and three refusals
    ("llama", "Linear", m, d) for m, d in zip(METHODS, DIRECTIONS * len(METHODS))
} | {("gpt2", "Conv1D", "lora", "lk2peft"), ("bert", "Embedding", "lora", "peft2lk"),
     ("gemma3", "Linear", "rslora", "lk2peft"), ("bart", "Linear", "lora", "peft2lk"),
     ("vit", "Conv2d", "lora", "lk2peft"), ("resnet", "Conv2d", "lora", "peft2lk"), ("tied", "Linear", "lora", "lk2peft"),
     ("llama", "Embedding", "dora", "peft2lk"), ("vit", "Conv2d", "pissa", "lk2peft"), ("gpt2", "Conv1D", "shira", "lk2peft")}


def cells() -> list[Cell]:
    """Every cell of the matrix, in table order."""
    out = []
    for arch, spec in ARCHS.items():
        for layer in LAYERS:
            if layer not in spec.layers:
                continue
            for method in METHODS:
                for direction in DIRECTIONS:
                    for check in CHECKS:
                        expected, defect = expectation(arch, layer, method, direction, check)
                        out.append(Cell(arch, layer, method, direction, check, expected, defect,
                                        (arch, layer, method, direction) in FAST))
    return out


# -- running a scenario ---------------------------------------------------------------------------------------
@dataclass
class Scenario:
    """What one (architecture, layer, method, direction) did: refusals, or each check's finding."""

    lorakit_error: Optional[BaseException] = None
    peft_error: Optional[BaseException] = None
    findings: dict = field(default_factory=dict)  # check -> "" (agrees) or what differs


def _differs(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> str:
    if a.shape != b.shape:
        return f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.allclose(a.float(), b.float(), atol=atol, rtol=RTOL):
        return ""
    return f"{what}: max abs difference {(a.float() - b.float()).abs().max().item():.3g}"


def _residual_base(tiny, source) -> torch.nn.Module:
    """The base model with the source's (moved) frozen weights: where an unconverted LoRA-GA adapter belongs."""
    model = tiny.make()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in source.named_parameters(remove_duplicate=False):  # a tied weight under each name
            if ".base_layer." in name:
                key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                if key in params:
                    params[key].copy_(p)
    return model


def _peft_load(base, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes lorakit's extra config fields (lorakit_method, ...)
        return PeftModel.from_pretrained(base, str(path)).eval()


def _merge_finding(tiny, ours, theirs, adapter_out) -> str:
    """lorakit's merge of ``ours`` against peft's merge of ``theirs`` (both copied first)."""
    try:
        mine = lorakit.merge(copy.deepcopy(ours))
    except ValueError as e:
        if re.search(TIED_REFUSAL, str(e)):
            return TIED_REFUSED
        raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = copy.deepcopy(theirs).merge_and_unload()
    a, b = mine.state_dict(), ref.state_dict()
    if sorted(a) != sorted(b):
        return f"merged state dict keys differ: lorakit only {sorted(set(a) - set(b))[:4]}, peft only {sorted(set(b) - set(a))[:4]}"
    found = [d for k in sorted(a) if (d := _differs(a[k], b[k], f"merged weight {k}", atol=1e-5))]
    found.append(_differs(tiny.run(mine), tiny.run(ref), "merged logits, lorakit vs peft"))
    found.append(_differs(tiny.run(mine), adapter_out, "lorakit merged logits vs the adapter's"))
    return "; ".join(f for f in found if f)[:600]


def _normal(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(value, key=str)
    return value


def files_finding(ours: Path, theirs: Path) -> str:
    """How two adapter directories differ in tensors (keys, shapes, values) and shared config fields."""
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(theirs / "adapter_model.safetensors"))
    found = []
    if sorted(a) != sorted(b):
        found.append(f"tensor keys differ: lorakit only {sorted(set(a) - set(b))[:3]}, peft only {sorted(set(b) - set(a))[:3]}")
    for key in sorted(set(a) & set(b)):
        if a[key].dtype != b[key].dtype:
            found.append(f"{key}: dtype {a[key].dtype} vs {b[key].dtype}")
        elif (d := _differs(a[key], b[key], key, atol=FILE_ATOL)):
            found.append(d)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, theirs))
    for name in sorted((set(ca) & set(cb)) - CONFIG_STAMPS):
        if _normal(ca[name]) != _normal(cb[name]):
            found.append(f"adapter_config.json {name}: lorakit {ca[name]!r}, peft {cb[name]!r}")
    return "; ".join(found)[:600]


def _lorakit_refusal(make) -> Optional[BaseException]:
    try:
        make()
    except Exception as e:  # noqa: BLE001  (the refusal is the finding)
        return e
    return None


@functools.lru_cache(maxsize=None)
def scenario(arch: str, layer: str, method: str, direction: str) -> Scenario:
    """Build, save and load one adapter across the two libraries; the findings of the three checks.

    For ``peft2lk`` the reference is peft's own load of its file (the file is the contract: peft's in-memory
    model after EVA, for one, differs from what peft itself loads back).
    """
    spec, m = ARCHS[arch], METHODS[method]
    tiny = spec.model()
    targets, conv1d = spec.layers[layer], layer == "Conv1D"
    batches = spec.batches() if method in DATA_DRIVEN else None
    base_out = tiny.run(tiny.make())
    result = Scenario()
    make_ours = functools.partial(m.lorakit, tiny.template, targets, conv1d, batches)
    make_theirs = functools.partial(m.peft, tiny.template, targets, conv1d, batches)
    with tempfile.TemporaryDirectory() as tmp:
        src_dir, back_dir = Path(tmp) / "source", Path(tmp) / "resaved"
        if direction == "lk2peft":
            try:
                source = perturb_(make_ours()).eval()
            except Exception as e:  # noqa: BLE001
                result.lorakit_error = e
                return result
            out = tiny.run(source)
        else:
            try:
                source = perturb_(make_theirs()).eval()  # peft's EVA leaves every submodule in training mode
                out = tiny.run(source)
            except Exception as e:  # noqa: BLE001  (peft has no such adapter, or its own model fails)
                result.peft_error = e
                result.lorakit_error = _lorakit_refusal(make_ours)
                return result
        if not (out - base_out).abs().max() > 1e-3:
            result.findings = dict.fromkeys(CHECKS, "the perturbed adapter does not change the output")
            return result
        target = (lambda: _residual_base(tiny, source)) if method == "lora_ga" else tiny.make
        if direction == "lk2peft":
            lorakit.save_peft(source, src_dir)
            try:
                loaded = _peft_load(target(), src_dir)
            except Exception as e:  # noqa: BLE001
                result.peft_error = e
                return result
            ours, theirs, reference = source, loaded, out
        else:
            source.save_pretrained(src_dir)
            theirs = _peft_load(target(), src_dir)
            reference = tiny.run(theirs)
            if (note := _differs(reference, out, "peft's load of its own file vs the model that saved it")):
                PEFT_ROUNDTRIP[f"{arch}-{layer}-{method}-{direction}"] = note
            try:
                loaded = ours = lorakit.load_peft(target(), src_dir)
            except Exception as e:  # noqa: BLE001
                result.lorakit_error = e
                return result
        result.findings["forward"] = _differs(tiny.run(loaded), reference, f"{direction}: logits of the loaded adapter")
        result.findings["merge"] = _merge_finding(tiny, ours, theirs, tiny.run(ours))
        if direction == "lk2peft":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded.save_pretrained(back_dir)
            result.findings["files"] = files_finding(src_dir, back_dir)
        else:
            lorakit.save_peft(loaded, back_dir)
            result.findings["files"] = files_finding(back_dir, src_dir)
    return result


def refusal_problem(error: Optional[BaseException], method: str, layer: str, loading: bool = False) -> str:
    """Why ``error`` is not the clear refusal lorakit owes for ``method`` on ``layer`` ("" when it is)."""
    if loading and isinstance(error, LOAD_REFUSAL[0]) and re.search(LOAD_REFUSAL[1], str(error)):
        return ""
    kind, pattern = INIT_REFUSAL if method in INITIALISERS and layer in ("Embedding", "Conv2d") else LAYER_REFUSAL
    if error is None:
        return f"lorakit accepted {method} on {layer}; expected {kind.__name__} matching {pattern!r}"
    if not isinstance(error, kind) or not re.search(pattern, str(error)):
        return f"lorakit raised {type(error).__name__}: {error}; expected {kind.__name__} matching {pattern!r}"
    return ""


def verdict(cell: Cell) -> str:
    """"" when the cell behaves as expected, else what went wrong."""
    found = scenario(cell.arch, cell.layer, cell.method, cell.direction)
    if cell.expected == "unsupported":  # lorakit refuses to make it, or to load peft's file of it
        loading = cell.direction == "peft2lk" and found.peft_error is None
        return refusal_problem(found.lorakit_error, cell.method, cell.layer, loading)
    if cell.expected == "peft-unsupported":
        return "" if found.peft_error is not None else f"peft accepted {cell.method} on {cell.layer}: add the cell's checks"
    for side, error in (("lorakit", found.lorakit_error), ("peft", found.peft_error)):
        if error is not None:
            return f"{side} raised {type(error).__name__}: {error}"[:600]
    finding = found.findings[cell.check]
    if cell.expected == "tied-refused":
        return "" if finding == TIED_REFUSED else f"expected lorakit to refuse merging into tied weights; found: {finding!r}"
    return finding
