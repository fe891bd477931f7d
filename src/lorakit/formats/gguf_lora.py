"""LoRA adapters as llama.cpp GGUF adapter files (``llama-cli --lora FILE``), written and read back.

Layout, as llama.cpp's ``convert_lora_to_gguf.py`` writes it: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``; per adapted weight, ``<gguf name>.lora_a`` [r, in] and
``<gguf name>.lora_b`` [out, r] (``blk.N.attn_q.weight.lora_a``...), names from gguf's tensor map. llama.cpp
applies ΔW = (alpha / r) · B A with r read from ``lora_b``, and its Llama kernels expect q and k rows in the
interleaved RoPE order, so B's rows of ``q_proj`` / ``k_proj`` are permuted exactly as the converter permutes those
weights (heads of n_head / n_kv_head rows, the two halves of each head interleaved).

Exact or refused: every method whose update is exactly s·B·A exports (NOLA, LoRA-XS... through ``low_rank``); a
module whose scale is not ``alpha / r`` under the file's single alpha (rsLoRA, ``rank_pattern``, ``alpha_pattern``,
other methods) has the difference folded into its B. Refused with the reason: architectures other than Llama
(other converters permute differently), embedding or ``lm_head`` targets, ``modules_to_save``, trained biases,
methods that are not low-rank (DoRA, FlyLoRA...).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..core.state import AdapterState

ARCHITECTURES = {"llama": "LLAMA"}  # HF model_type -> gguf.MODEL_ARCH member
OUT_TYPES = {"f32": torch.float32, "f16": torch.float16}


class GGUFExportError(ValueError):
    """An adapter (or base) that a GGUF LoRA file cannot hold exactly."""


def _permute_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, rows [0:d/2] and [d/2:d] interleaved."""
    out, r = b.shape
    return b.reshape(heads, 2, out // heads // 2, r).swapaxes(1, 2).reshape(out, r)


def _unpermute_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    out, r = b.shape
    return b.reshape(heads, out // heads // 2, 2, r).swapaxes(1, 2).reshape(out, r)


def _heads(path: str, config) -> int | None:
    if path.endswith("q_proj"):
        return config.num_attention_heads
    if path.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _name_map(config):
    import gguf

    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"GGUF LoRA export supports the base architectures {sorted(ARCHITECTURES)}, not "
                              f"{model_type!r}: llama.cpp's converters lay other models' weights out differently")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    return arch, gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def _gguf_name(names, path: str) -> str:
    found = names.get_name(path + ".weight", try_suffixes=(".weight",))
    if found is None or path.endswith("lm_head") or "embed" in path:
        raise GGUFExportError(f"module '{path}': llama.cpp adapters cover the transformer blocks' linear layers only "
                              "(no embeddings or output head here); train without that target to export")
    return found


def gguf_tensors(state: AdapterState, config, out_type: str = "f32") -> tuple[dict[str, np.ndarray], float]:
    """(tensors by GGUF name, alpha) for ``state`` on a base with HF ``config``."""
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"out_type must be one of {sorted(OUT_TYPES)}, not {out_type!r}")
    _, names = _name_map(config)
    if state.modules_to_save or state.base_tensors:
        kept = sorted(state.modules_to_save) or sorted(state.base_tensors)
        raise GGUFExportError(f"the adapter carries full tensors ({', '.join(kept[:3])}); a GGUF LoRA holds only "
                              "low-rank pairs")
    state.require("exportable_to_lora", "export the adapter to GGUF")
    alpha = float(getattr(state.config, "lora_alpha", state.config.r) or state.config.r)
    tensors = {}
    for path in state.modules():
        name = _gguf_name(names, path)
        factors = state.low_rank(path)
        if factors is None or "lora_embedding_A" in state.tensors[path]:
            raise GGUFExportError(f"module '{path}': its update has no (A, B) pair for a linear layer")
        a, b, scale = factors
        b = b.float() * (scale * a.shape[0] / alpha)  # llama.cpp scales by alpha / r: fold in what differs
        heads = _heads(path, config)
        if heads is not None:
            b = _permute_rows(b, heads)
        dtype = OUT_TYPES[out_type]
        tensors[name + ".lora_a"] = a.float().to(dtype).contiguous().numpy()
        tensors[name + ".lora_b"] = b.to(dtype).contiguous().numpy()
    return tensors, alpha


def export_gguf(state: AdapterState, config, path: str | os.PathLike, out_type: str = "f32",
                overwrite: bool = False) -> Path:
    """Write ``state`` as a llama.cpp GGUF LoRA file at ``path`` (atomically); ``config``: the base's HF config."""
    import gguf

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; choose another path or pass overwrite")
    tensors, alpha = gguf_tensors(state, config, out_type)
    arch, _ = _name_map(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_gguf_deltas(path: str | os.PathLike, config) -> dict[str, torch.Tensor]:
    """ΔW per HF module path as llama.cpp computes it from the file (q/k rows put back in HF order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    kind = bytes(fields[gguf.Keys.Adapter.TYPE].parts[-1]).decode()
    if kind != "lora":
        raise GGUFExportError(f"{path}: adapter.type is {kind!r}, not 'lora'")
    alpha = float(fields[gguf.Keys.Adapter.LORA_ALPHA].parts[-1][0])
    _, names = _name_map(config)
    paths = {}
    for i in range(config.num_hidden_layers):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            hf = f"model.layers.{i}.{leaf}"
            paths[names.get_name(hf + ".weight", try_suffixes=(".weight",))] = hf
    data = {t.name: torch.from_numpy(np.array(t.data)).float() for t in reader.tensors}
    out = {}
    for name in sorted({n.rsplit(".lora_", 1)[0] for n in data}):
        a, b = data[name + ".lora_a"], data[name + ".lora_b"]
        hf = paths[name]
        heads = _heads(hf, config)
        if heads is not None:
            b = _unpermute_rows(b, heads)
        out[hf] = (alpha / b.shape[1]) * b @ a
    return out
