"""The testbed build: every stage writes what diffusers and the benchmark read, and a finished build is reused."""
from __future__ import annotations

import json

import numpy as np

from lorakit.diffusion import load_loras
from lorakit.diffusion.shapes import CONCEPTS, Scene, draw
from lorakit.diffusion.zoo import ZooSettings, build


def test_build_once_then_cached(tmp_path, capsys):
    settings = ZooSettings(base_steps=1, base_batch=2, lora_steps=1, lora_batch=2, judge_steps=1)
    out = build(tmp_path / "zoo", settings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["base_steps"] == 1 and manifest["concepts"] == list(CONCEPTS)
    from lorakit.diffusion.pipeline import ConceptPipeline

    pipe = ConceptPipeline.from_pretrained(out / "model")
    assert load_loras(pipe, [out / "loras" / c for c in CONCEPTS]) == list(CONCEPTS)
    stamp = (out / "judge.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    build(out, settings)
    assert "cached" in capsys.readouterr().out
    assert (out / "judge.safetensors").stat().st_mtime_ns == stamp


def test_scenes_show_their_concepts():
    plain = draw(Scene("red", "circle", "left"))
    framed = draw(Scene("red", "circle", "left", framed=True))
    striped = draw(Scene("red", "circle", "left", striped=True))
    assert np.all(framed[0] == 1.0) and not np.all(plain[0] == 1.0)
    assert striped[:, 20].std() > 0.1 and plain[:, 28].std() == 0  # stripes span rows; plain background is flat
    left, right = draw(Scene("blue", "cross", "left")), draw(Scene("blue", "cross", "right"))
    assert left[:, :16].sum() > left[:, 16:].sum() and right[:, 16:].sum() > right[:, :16].sum()
