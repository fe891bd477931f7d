"""LoRA files in diffusers' layout: written by lorakit, read back by diffusers' own loader, checked on the way in."""
from __future__ import annotations

import pytest
import torch

from lorakit.diffusion import load_loras, read_lora, save_lora
from lorakit.diffusion.files import WEIGHT_NAME

from diffusion_testbed import fresh_pipeline, make_lora, unet_inputs


def _eps(pipe, x, t, c):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=c).sample


def test_round_trip_through_diffusers_load_lora_weights(tmp_path):
    pipe = fresh_pipeline()
    make_lora(pipe, "cross", seed=3)
    x, t, c = unet_inputs()
    want = _eps(pipe, x, t, c)
    path = save_lora(pipe, "cross", tmp_path / "cross")
    assert path.name == WEIGHT_NAME
    plain = fresh_pipeline()
    base = _eps(plain, x, t, c)
    plain.load_lora_weights(tmp_path / "cross", adapter_name="cross")  # diffusers alone, no lorakit on the way
    ours = fresh_pipeline()
    load_loras(ours, [tmp_path / "cross"])
    assert not torch.allclose(want, base, atol=1e-3)  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(_eps(plain, x, t, c), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_eps(ours, x, t, c), want, rtol=0, atol=1e-6)


def test_every_module_in_the_file_carries_the_adapter(lora_files, loaded):
    pipe, names = loaded
    state = read_lora(pipe, lora_files[1]["cross"])
    adapted = [m for _, m in pipe.unet.named_modules() if "cross" in getattr(m, "lora_A", {})]
    assert len(adapted) * 2 == len(state) > 0


def test_lora_for_another_network_names_the_shapes(tmp_path):
    from diffusers import UNet2DConditionModel

    from lorakit.diffusion.pipeline import ConceptPipeline

    other = fresh_pipeline()
    wide = UNet2DConditionModel(**{**other.unet.config, "block_out_channels": (16, 32)})
    other = ConceptPipeline(wide, other.text_encoder, other.tokenizer, other.scheduler)
    make_lora(other, "alien", seed=1)
    save_lora(other, "alien", tmp_path / "alien")
    pipe = fresh_pipeline()
    with pytest.raises(ValueError, match=r"another network: .*shape \(2, 16.*weight \(32, 32"):
        load_loras(pipe, [tmp_path / "alien"])
    assert not getattr(pipe.unet, "peft_config", None)  # refused before anything was loaded


def test_mixed_key_file_that_diffusers_half_loads_is_refused(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = fresh_pipeline()
    make_lora(pipe, "cross", seed=3)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="cross"))
    assert any(".lora.down." in k for k in state) and any(".lora_A." in k for k in state)
    save_file({f"unet.{k}": v for k, v in state.items()}, str(tmp_path / "mixed.safetensors"))
    target = fresh_pipeline()
    with pytest.raises(ValueError, match="skipped"):
        load_loras(target, [tmp_path / "mixed.safetensors"])
    assert "mixed" not in (getattr(target.unet, "peft_config", None) or {})


def test_missing_file_and_duplicate_names(lora_files, tmp_path):
    pipe = fresh_pipeline()
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        load_loras(pipe, [tmp_path / "nothing"])
    files = lora_files[1]
    with pytest.raises(ValueError, match="same adapter name"):
        load_loras(pipe, [files["cross"], files["cross"]])


def test_save_refuses_to_overwrite(lora_files):
    pipe = fresh_pipeline()
    make_lora(pipe, "cross", seed=3)
    with pytest.raises(FileExistsError):
        save_lora(pipe, "cross", lora_files[1]["cross"])


def test_kohya_style_file_round_trips_through_diffusers_converter(tmp_path):
    """lorakit writes kohya keys (lora_unet_<module>.lora_down/up, alpha); diffusers' own loader reads them back."""
    from safetensors import safe_open

    pipe = fresh_pipeline()
    make_lora(pipe, "cross", seed=3)  # r=2, alpha=4: a scale of 2, which an alpha of the rank would halve
    x, t, c = unet_inputs()
    want = _eps(pipe, x, t, c)
    path = save_lora(pipe, "cross", tmp_path / "cross", kohya=True)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha")
    assert keys and all(k.startswith("lora_unet_") for k in keys) and float(alpha) == 4.0
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)  # convolutions too
    plain = fresh_pipeline()
    plain.load_lora_weights(str(tmp_path / "cross"), adapter_name="cross")  # diffusers alone
    torch.testing.assert_close(_eps(plain, x, t, c), want, rtol=0, atol=1e-6)
    ours = fresh_pipeline()
    assert load_loras(ours, [path]) == ["cross"]
    torch.testing.assert_close(_eps(ours, x, t, c), want, rtol=0, atol=1e-6)
    adapted = {n for n, m in pipe.unet.named_modules() if "cross" in getattr(m, "lora_A", {})}
    assert adapted == {n for n, m in ours.unet.named_modules() if "cross" in getattr(m, "lora_A", {})}


def test_kohya_files_for_another_network_or_unconverted_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from lorakit.diffusion.pipeline import ConceptPipeline
    from lorakit.diffusion.tiny import build_pixart

    other = fresh_pipeline()
    wide = UNet2DConditionModel(**{**other.unet.config, "block_out_channels": (16, 32)})
    other = ConceptPipeline(wide, other.text_encoder, other.tokenizer, other.scheduler)
    make_lora(other, "alien", seed=1)
    path = save_lora(other, "alien", tmp_path / "alien", kohya=True)
    shapes = r"another network: down_blocks.0.resnets.0.conv1.lora_A.weight has shape \(2, 16, 3, 3\)"
    with pytest.raises(ValueError, match=shapes):
        load_loras(fresh_pipeline(), [path])
    save_file({"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 16)},
              str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match="kohya-style keys .* that diffusers' PixArtAlphaPipeline does not convert"):
        load_loras(build_pixart(), [tmp_path / "k.safetensors"])
    with pytest.raises(ValueError, match="kohya-style files are written for UNet pipelines"):
        save_lora(build_pixart(), "x", tmp_path / "x", kohya=True)
