"""The testbed's judge: a small CNN that says which concepts an image shows and where its object is.

Trained on drawn scenes (every attribute, LoRA concepts included) with pixel noise, so that slightly imperfect
generated images are still read. ``presence`` turns its readings into per-concept booleans.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .shapes import COLOURS, CONCEPTS, POSITIONS, SHAPES, Scene, batch, sample_scene

NOISE = 0.8  # generated images keep visible pixel noise: the judge is trained on noise of std up to this
HEADS = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS, "striped": (False, True), "framed": (False, True)}


class Judge(nn.Module):
    """Five classification heads over a three-layer CNN on (N, 3, 32, 32) images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(32 * 16, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict]:
        """The attributes each image shows (a dict per image, values from HEADS)."""
        out = {k: v.argmax(-1).tolist() for k, v in self(images).items()}
        return [{k: HEADS[k][out[k][i]] for k in HEADS} for i in range(images.shape[0])]


def presence(reading: dict, concepts: tuple[str, ...]) -> dict[str, bool]:
    """Per concept (a key of CONCEPTS): whether the judge's reading shows it."""
    return {c: reading[CONCEPTS[c][0]] == CONCEPTS[c][1] for c in concepts}


def _random_scene(rng: np.random.Generator) -> Scene:
    return Scene(colour=str(rng.choice(COLOURS)), shape=str(rng.choice(SHAPES)), position=str(rng.choice(POSITIONS)),
                 striped=bool(rng.integers(2)), framed=bool(rng.integers(2)), dy=int(rng.integers(-2, 3)))


def train_judge(steps: int = 400, seed: int = 0, progress=None, noise: float = NOISE) -> tuple[Judge, float]:
    """A judge trained on noisy drawn scenes, and its accuracy (all heads right) on 512 fresh ones."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), 3e-3)
    for _ in (progress or (lambda r: r))(range(steps)):
        scenes = [_random_scene(rng) for _ in range(64)]
        x = torch.from_numpy(batch(scenes, noise=float(rng.uniform(0, noise)), rng=rng))
        logits = judge(x)
        loss = sum(nn.functional.cross_entropy(logits[k], torch.tensor([HEADS[k].index(getattr(s, k)) for s in scenes],
                                                                  device=logits[k].device))
                   for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scenes = [_random_scene(rng) for _ in range(512)]
    readings = judge.read(torch.from_numpy(batch(scenes, noise=noise / 2, rng=rng)))
    acc = float(np.mean([all(r[k] == getattr(s, k) for k in HEADS) for r, s in zip(readings, scenes)]))
    return judge, acc
