"""Sentence embeddings of task text with all-MiniLM-L6-v2 (the packaged ``minilm``), cached in the library.

The embedding is the model card's: token states of the last layer averaged over the attention mask, then
L2-normalised, inputs truncated at 256 tokens (``sentence_bert_config.json``); it equals
``SentenceTransformer(minilm_dir()).encode(texts, normalize_embeddings=True)`` without importing that package.
The cache (``.cache/text-embeddings.safetensors`` in the library) is keyed by a digest of each text, so an
entry whose description changes gets a new embedding; keys no entry uses are dropped on the next write.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

MODEL_ID = "all-MiniLM-L6-v2"
MAX_TOKENS = 256
CACHE = Path(".cache") / "text-embeddings.safetensors"


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from ..zoo import minilm_dir

    path = str(minilm_dir())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), 384) unit vectors: MiniLM's mean-pooled, normalised sentence embeddings."""
    model, tokenizer = _minilm()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def key(text: str) -> str:
    return hashlib.sha256(f"{MODEL_ID}\n{text}".encode()).hexdigest()[:24]


def cached_embed(root: Path, texts: Sequence[str]) -> torch.Tensor:
    """``embed(texts)`` through the library's cache at ``root`` (written back when it changed)."""
    from safetensors.torch import load_file, save_file

    file = root / CACHE
    try:
        cache = load_file(str(file)) if file.is_file() else {}
    except Exception:  # a damaged cache is only a cache: recompute
        cache = {}
    keys = [key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items())
    if missing:
        cache.update(zip([k for k, _ in missing], embed([t for _, t in missing])))
    kept = {k: cache[k].contiguous() for k in dict.fromkeys(keys)}
    if missing or len(kept) != len(cache):
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".text-", dir=file.parent)
        os.close(fd)
        try:
            save_file(kept, tmp, metadata={"model": MODEL_ID})
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return torch.stack([kept[k] for k in keys]) if keys else torch.zeros(0, 384)
