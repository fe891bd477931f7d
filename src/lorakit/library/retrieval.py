"""Text-query retrieval over a library: by description (MiniLM cosine) or by weights (AutoLoRA's encoder).

``search(library, query, k, by="description")`` ranks the entries that have a description by the cosine between
the query's and each description's MiniLM embedding. ``by="weights"`` ranks entries by the cosine between the
query's embedding and each adapter's weight embedding (``weights.py``), so entries with no description are
found too; the encoder is trained on the entries that do have one, and kept in ``.cache/`` with the entry
embeddings under a key over every entry's name, weights digest and description and the encoder settings, so
any change to an entry retrains it. Weight retrieval compares adapters of one base model: a library holding
several is searched for the one given by ``fingerprint`` (or ``base``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..core import fingerprint as fingerprints
from ..formats.peft import load_state
from . import text
from .manifest import Entry, LibraryError
from .weights import EncoderConfig, factors, stack, train_encoder

BY = ("description", "weights")


def search(library, query: str, k: int = 5, by: str = "description", fingerprint: Optional[str] = None,
           base=None, config: EncoderConfig = EncoderConfig()) -> list[tuple[Entry, float]]:
    """The ``k`` best entries for ``query`` with their cosine scores, best first."""
    if by not in BY:
        raise LibraryError(f"search by {by!r}: expected one of {', '.join(BY)}")
    if not isinstance(k, int) or k < 1:
        raise LibraryError(f"k must be a whole number >= 1, found {k!r}")
    if base is not None:
        fingerprint = fingerprints.record(base)["fingerprint"] if isinstance(base, torch.nn.Module) else base
    entries = [e for e in library.list() if fingerprint is None or e.fingerprint == fingerprint]
    q = text.embed([query])[0]
    if by == "description":
        described = [e for e in entries if e.description.strip()]
        if not described:
            return []
        vectors = description_embeddings(library)
        return _top(described, torch.stack([vectors[e.name] for e in described]) @ q, k)
    if not entries:
        return []
    prints = sorted({e.fingerprint for e in entries})
    if len(prints) > 1:
        raise LibraryError(f"{library.root} holds adapters for {len(prints)} base models (fingerprints "
                           f"{', '.join(prints)}); weight retrieval compares adapters of one: pass fingerprint= "
                           "(--fingerprint)")
    return _top(entries, weight_embeddings(library, entries, config) @ q, k)


def description_embeddings(library) -> dict[str, torch.Tensor]:
    """MiniLM embeddings of every described entry's description, by entry name (through the cache)."""
    described = [e for e in library.list() if e.description.strip()]
    return dict(zip([e.name for e in described], text.cached_embed(library.root, [e.description for e in described])))


def _top(entries: list[Entry], scores: torch.Tensor, k: int) -> list[tuple[Entry, float]]:
    order = sorted(range(len(entries)), key=lambda i: (-float(scores[i]), entries[i].name))
    return [(entries[i], float(scores[i])) for i in order[:k]]


def weight_embeddings(library, entries: list[Entry], config: EncoderConfig = EncoderConfig()) -> torch.Tensor:
    """(len(entries), 384): each entry's weight embedding, from the cache when nothing changed."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([[(e.name, e.sha256, e.description) for e in entries],
                                     dataclasses.asdict(config), text.MODEL_ID]).encode()).hexdigest()[:24]
    file = library.root / ".cache" / f"weights-{entries[0].fingerprint}.safetensors"
    if file.is_file():
        try:
            cached = load_file(str(file))
            if key in cached:
                return cached[key]
        except Exception:  # a damaged cache is only a cache: recompute
            pass
    batch = [factors(load_state(library.path_of(e.name)), f"library entry {e.name!r}") for e in entries]
    train = [i for i, e in enumerate(entries) if e.description.strip()]
    vectors = description_embeddings(library)
    texts = torch.stack([vectors[entries[i].name] for i in train]) if train else torch.zeros(0, 384)
    encoder = train_encoder([batch[i] for i in train], texts, config)
    with torch.no_grad():
        embedded = encoder(stack(batch, encoder.shapes))
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".weights-", dir=file.parent)
    os.close(fd)
    try:
        save_file({key: embedded.contiguous()}, tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return embedded
