"""The synthetic world of the diffusion testbed: 32x32 RGB images whose concepts can be measured.

An image holds one object (a shape in a colour, left or right), on a plain or striped background, with or without
a white frame. The base model learns the base vocabulary; each concept LoRA teaches one word the base never saw:
``cross`` (object), ``yellow`` (colour), ``striped`` (style) and ``framed`` (background). Drawing is numpy only and
deterministic given the attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 32
BASE_COLOURS = ("red", "green", "blue")
BASE_SHAPES = ("circle", "square", "triangle")
COLOURS = BASE_COLOURS + ("yellow",)
SHAPES = BASE_SHAPES + ("cross",)
POSITIONS = ("left", "right")
RGB = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.88, 0.1)}
# concept name -> (attribute, value): what a LoRA teaches and what the judge checks
CONCEPTS = {"cross": ("shape", "cross"), "yellow": ("colour", "yellow"), "striped": ("striped", True),
            "framed": ("framed", True)}
VOCAB = COLOURS + SHAPES + POSITIONS + ("striped", "framed")


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``prompt`` is its caption."""

    colour: str
    shape: str
    position: str
    striped: bool = False
    framed: bool = False
    dy: int = 0  # vertical jitter of the object, in pixels

    @property
    def prompt(self) -> str:
        words = [self.colour, self.shape, self.position] + ["striped"] * self.striped + ["framed"] * self.framed
        return " ".join(words)

    def has(self, concept: str) -> bool:
        """Whether the scene shows ``concept`` (a key of CONCEPTS)."""
        attribute, value = CONCEPTS[concept]
        return getattr(self, attribute) == value


def _object_mask(shape: str, cx: float, cy: float, r: float = 6.0) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(scene: Scene) -> np.ndarray:
    """The scene as an (SIZE, SIZE, 3) float32 array in [0, 1]."""
    img = np.full((SIZE, SIZE, 3), 0.12, np.float32)
    if scene.striped:
        img[(np.arange(SIZE) // 2) % 2 == 0, :, :] = 0.5  # horizontal stripes, 2 px
    if scene.framed:
        img[:2], img[-2:], img[:, :2], img[:, -2:] = 1.0, 1.0, 1.0, 1.0
    cx = SIZE * (0.28 if scene.position == "left" else 0.72)
    img[_object_mask(scene.shape, cx, SIZE / 2 + scene.dy)] = RGB[scene.colour]
    return img


def sample_scene(rng: np.random.Generator, concepts: tuple[str, ...] = ()) -> Scene:
    """A random base scene showing exactly ``concepts`` (names in CONCEPTS) besides base attributes."""
    scene = Scene(colour=str(rng.choice(BASE_COLOURS)), shape=str(rng.choice(BASE_SHAPES)),
                  position=str(rng.choice(POSITIONS)), dy=int(rng.integers(-2, 3)))
    for c in concepts:
        attribute, value = CONCEPTS[c]
        scene = replace(scene, **{attribute: value})
    return scene


def batch(scenes: list[Scene], noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Scenes drawn as an (N, 3, SIZE, SIZE) array in [-1, 1], with optional Gaussian pixel noise."""
    x = np.stack([draw(s) for s in scenes]).transpose(0, 3, 1, 2) * 2 - 1
    if noise:
        x = x + noise * (rng or np.random.default_rng(0)).standard_normal(x.shape).astype(np.float32)
    return x.astype(np.float32)
