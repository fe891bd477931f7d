"""``lorakit diffuse``: an image from composed LoRAs, and one-line errors with exit status 2."""
from __future__ import annotations

import pytest
from diffusion_testbed import fresh_pipeline, make_lora

from lorakit.cli import main
from lorakit.diffusion import save_lora


def _run(capsys, *argv):
    code = main(["diffuse", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_diffuse_writes_an_image(lora_files, tmp_path, capsys):
    from PIL import Image

    root, files = lora_files
    out = tmp_path / "out.png"
    code, stdout, err = _run(capsys, "--model", root / "model", "--lora", files["cross"], "--lora", files["yellow"],
                             "--method", "composite", "--prompt", "yellow cross left", "--steps", 2, "-o", out)
    assert code == 0, err
    assert Image.open(out).size == (32, 32)
    assert "4 denoiser evaluations" in stdout  # 2 steps x 2 LoRAs
    code, _, err = _run(capsys, "--model", root / "model", "--lora", files["cross"], "--prompt", "cross", "-o", out)
    assert code == 2 and "exists" in err  # no silent overwrite


@pytest.mark.parametrize("extra, message", [
    (["--method", "blend"], "unknown composition method 'blend'"),
    (["--prompt", "cross"], "2 LoRAs but the prompt 'cross' has 1 token"),
    (["--method", "lora_composer", "--layout", "0,0,16,16;16,0,33,16"],
     "layout box 2 (16,0,33,16) is outside the 32x32"),
    (["--method", "switch", "--layout", "0,0,16,16;16,0,32,16"], "takes no layout"),
    (["--weights", "1"], "--weights has 1 values for 2 LoRAs"),
])
def test_diffuse_user_errors(lora_files, tmp_path, capsys, extra, message):
    root, files = lora_files
    argv = ["--model", root / "model", "--lora", files["cross"], "--lora", files["yellow"], "--prompt",
            "yellow cross left", "-o", tmp_path / "x.png", "--steps", 1]
    code, _, err = _run(capsys, *argv, *extra)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_diffuse_refuses_a_lora_for_another_network(lora_files, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from lorakit.diffusion.pipeline import ConceptPipeline

    root, _ = lora_files
    base = fresh_pipeline()
    other = ConceptPipeline(UNet2DConditionModel(**{**base.unet.config, "cross_attention_dim": 16}),
                            base.text_encoder, base.tokenizer, base.scheduler)
    make_lora(other, "alien", seed=2, targets=["to_k"])
    save_lora(other, "alien", tmp_path / "alien")
    code, _, err = _run(capsys, "--model", root / "model", "--lora", tmp_path / "alien", "--prompt", "cross",
                        "-o", tmp_path / "x.png")
    assert code == 2 and "another network" in err and "(64, 32)" in err and "(2, 16)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, evaluations", [
    (["--method", "lora_composer", "--layout", "0,0,16,32;16,0,32,32"], 5),  # re-init, refine, predict; refine, predict
    (["--method", "clora", "--option", "refine_iters=0"], 6),  # base + 2 LoRAs per step
])
def test_diffuse_attention_methods(lora_files, tmp_path, capsys, extra, evaluations):
    root, files = lora_files
    out = tmp_path / "out.png"
    code, stdout, err = _run(capsys, "--model", root / "model", "--lora", files["cross"], "--lora", files["yellow"],
                             "--prompt", "yellow cross left", "--steps", 2, "-o", out, *extra)
    assert code == 0, err
    assert f"{evaluations} denoiser evaluations" in stdout


def test_diffuse_refuses_a_layout_before_loading(tmp_path, capsys):
    code, _, err = _run(capsys, "--model", tmp_path / "missing", "--lora", tmp_path, "--prompt", "cross",
                        "--method", "clora", "--layout", "0,0,16,16", "-o", tmp_path / "x.png")
    assert code == 2 and "method 'clora' takes no layout; layout-aware methods: lora_composer" in err
