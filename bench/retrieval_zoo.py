"""Weight retrieval on tasks the encoder never saw: k-fold over the task zoo's MiniLM adapters (``make zoo``).

For each seed, the zoo's tasks are shuffled into ``FOLDS`` folds. For each fold, the library's described entries
are the other folds' adapters (each task's final adapter and its training snapshots, with the task's
description); the candidates are the fold's final adapters with no description; each fold task's query is its
description, which no entry in the library carries. Recall@k: the query's adapter is among the top k of the
fold's candidates (chance k / fold size). "With descriptions": every final adapter described, the encoder fitted
on all of them, each task's description ranking all final adapters (chance k / tasks).
"""
from __future__ import annotations

import random
import time

import torch

from common import ci

from lorakit.generate.zooindex import Zoo
from lorakit.library import EncoderConfig, text
from lorakit.library.weights import factors, stack, train_encoder

FOLDS = 5


def folds(names: list[str], seed: int, k: int = FOLDS) -> list[list[str]]:
    """``names`` shuffled by ``seed`` into ``k`` folds of (nearly) equal size."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return [order[i::k] for i in range(k)]


def _embed(probe: str, seed: int, train: list, texts: torch.Tensor, candidates: list) -> torch.Tensor:
    encoder = train_encoder(train, texts, EncoderConfig(probe=probe, seed=seed))
    with torch.no_grad():
        return encoder(stack(candidates, encoder.shapes))


def _ranks(emb: torch.Tensor, queries: torch.Tensor) -> list[int]:
    """0-based rank of candidate i for query i."""
    scores = queries @ emb.T
    return [int((scores[i] > scores[i, i]).sum()) for i in range(len(queries))]


def run(zoo_root: str, probes: dict[str, list[int]], log=print) -> dict:
    """Recall@1/5 per probe and seed, unseen (k-fold) and with descriptions; ``probes``: probe -> its seeds."""
    zoo = Zoo.open(zoo_root)
    entries = zoo.entries()
    names = [e["name"] for e in entries]
    final = {n: factors(zoo.state(n), n) for n in names}
    snaps = {e["name"]: [factors(zoo.state(e["name"], s), s) for s in e.get("snapshots", [])] for e in entries}
    vec = dict(zip(names, text.embed([e["description"] for e in entries])))
    out = {"tasks": len(names), "folds": FOLDS, "snapshots_per_task": len(snaps[names[0]]), "rows": {}}
    for probe, seeds in probes.items():
        unseen, seen, fit_s = [], [], []
        for seed in seeds:
            ranks = []
            for held in folds(names, seed):
                train = [n for n in names if n not in held]
                batch = [final[n] for n in train] + [f for n in train for f in snaps[n]]
                texts = torch.stack([vec[n] for n in train] + [vec[n] for n in train for _ in snaps[n]])
                t0 = time.perf_counter()
                emb = _embed(probe, seed, batch, texts, [final[n] for n in held])
                fit_s.append(time.perf_counter() - t0)
                ranks += _ranks(emb, torch.stack([vec[n] for n in held]))
            unseen.append({"seed": seed, "recall@1": sum(r < 1 for r in ranks) / len(ranks),
                           "recall@5": sum(r < 5 for r in ranks) / len(ranks)})
            emb = _embed(probe, seed, [final[n] for n in names], torch.stack([vec[n] for n in names]),
                         [final[n] for n in names])
            ranks = _ranks(emb, torch.stack([vec[n] for n in names]))
            seen.append({"seed": seed, "recall@1": sum(r < 1 for r in ranks) / len(ranks),
                         "recall@5": sum(r < 5 for r in ranks) / len(ranks)})
            log(f"zoo folds, {probe}, seed {seed}: unseen recall@1 {unseen[-1]['recall@1']:.3f}, "
                f"with descriptions {seen[-1]['recall@1']:.3f}")
        out["rows"][probe] = {"unseen": unseen, "with_descriptions": seen,
                              "fit_s_median": round(sorted(fit_s)[len(fit_s) // 2], 2)}
    fold = len(names) / FOLDS
    out["chance"] = {"unseen": {"1": 1 / fold, "5": min(1.0, 5 / fold)},
                     "with_descriptions": {"1": 1 / len(names), "5": 5 / len(names)}}
    return out


def summary(rows: list[dict], k: int) -> tuple[float, float]:
    """Mean recall@k over seeds and the half-width of its 95% t-interval."""
    return ci([r[f"recall@{k}"] for r in rows])
