"""LoRA-Composer: region injection in cross-attention, isolation in self-attention, re-initialisation, refusals."""
from __future__ import annotations

import pytest
import torch
from diffusion_testbed import fresh_pipeline, make_lora

from lorakit.diffusion import compose
from lorakit.diffusion.attention import Probe
from lorakit.diffusion.lora_composer import box_loss, cells, reinitialise

PROMPT = "yellow cross left"
LEFT, RIGHT = (0, 0, 16, 32), (16, 0, 32, 32)  # pixels; on the 8x8 attention grid: columns 0-3 and 4-7


def generate(pipe, steps=3, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images


def attention_call(pipe, composer, layer, cross):
    """One attention layer through the composer's probe: inputs, the probe's output, the plain output."""
    from diffusers.models.attention_processor import AttnProcessor

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 64, 64, generator=g)  # 8x8 positions of the 64-channel block
    context = torch.randn(2, 8, 32, generator=g) if cross else None
    composer.sample = torch.zeros(2, 12, 16, 16)
    composer.recording, composer.store = True, {}
    with torch.no_grad():
        ours = Probe(composer)(layer, hidden, context)
        plain = AttnProcessor()(layer, hidden, context)
    composer.recording = False
    return hidden, context, ours, plain


def test_injection_outside_the_boxes_is_the_base_and_inside_is_the_loras_attention(loaded):
    pipe, names = loaded
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, (8, 8, 24, 24)]) as s:
        pipe.unet.disable_adapters()  # no background LoRA: the base everywhere but in the boxes
        hidden, context, ours, plain = attention_call(pipe, s.composer, layer, cross=True)
        pipe.unet.enable_adapters()
        pipe.unet.set_adapters(["cross"])  # LoRA "cross" alone in k, v and out; q from the base
        q = layer.head_to_batch_dim(layer.to_q.base_layer(hidden))
        k, v = layer.head_to_batch_dim(layer.to_k(context)), layer.head_to_batch_dim(layer.to_v(context))
        cross_out = layer.to_out[0](layer.batch_to_head_dim(torch.bmm(layer.get_attention_scores(q, k), v)))
    grid = torch.zeros(8, 8, dtype=torch.int)
    grid[:, 0:4] += 1  # LEFT
    grid[2:6, 2:6] += 2  # the second box (8..24 px -> cells 2..5)
    where = grid.flatten()
    torch.testing.assert_close(ours[:, where == 0], plain[:, where == 0], rtol=0, atol=1e-6)  # nothing injected
    torch.testing.assert_close(ours[:, where == 1], cross_out[:, where == 1], rtol=0, atol=1e-5)
    assert not torch.allclose(ours[:, where == 1], plain[:, where == 1], atol=1e-4)
    region = s.composer.store["region", ((8, 8), 0)][0]
    assert region.shape == (2, 8, 64, 8)  # (images, heads, cells, tokens): the whole image, recorded for the loss


def test_self_attention_queries_in_a_box_do_not_see_other_boxes(loaded):
    pipe, names = loaded
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, RIGHT]) as s:
        attention_call(pipe, s.composer, layer, cross=False)
    probs = s.composer.store[False, (8, 8)][0].mean(1)[0]  # (64 queries, 64 keys)
    left = (torch.arange(64) % 8) < 4
    assert float(probs[left][:, ~left].max()) < 1e-6 and float(probs[~left][:, left].max()) < 1e-6
    torch.testing.assert_close(probs.sum(1), torch.ones(64))
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, LEFT]) as s:  # coinciding boxes
        _, _, ours, plain = attention_call(pipe, s.composer, layer, cross=False)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)  # a box still attends to itself: nothing hidden


def test_reinitialisation_copies_the_best_window_into_the_box():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, generator=g)
    score = torch.zeros(4, 4)
    score[2:4, 1:3] = 1.0  # the 2x2 window with the highest sum starts at cell (2, 1)
    out = reinitialise(x, [score], [(0, 0, 2, 2)], scale=2)
    copied = x.clone()
    copied[:, 0:4, 0:4] = x[:, 4:8, 2:6]
    want = (copied - copied.mean()) / copied.std() * x.std() + x.mean()
    torch.testing.assert_close(out, want)
    assert float(out.mean()) == pytest.approx(float(x.mean()), abs=1e-6)


def test_box_loss_falls_as_attention_moves_into_the_box():
    box = (0, 0, 4, 4)
    inside = torch.zeros(8, 8)
    inside[0:4, 0:4] = 1.0
    self_in = torch.eye(64)  # each cell attends to itself only: nothing leaks out of the box
    self_out = torch.full((64, 64), 1 / 64)
    assert float(box_loss(inside, self_in, box)) < float(box_loss(inside.flip(0, 1), self_in, box))
    assert float(box_loss(inside, self_in, box)) < float(box_loss(inside, self_out, box))


def test_generation_refines_reinitialises_and_restores(loaded):
    pipe, names = loaded
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, RIGHT]) as s:
        ours = generate(pipe, steps=4)
    steps = [c[0] for c in s.calls]
    assert steps[:5] == [0, 0, 0, 1, 1]  # re-init, refine, predict at 0; refine + predict while k <= T/2
    assert steps[-2:] == [2, 3] and len(steps) in (7, 8)  # step 2 refines unless the loss rose at step 1
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, RIGHT], reinit=False) as s:
        plain = generate(pipe, steps=4)
    assert not torch.allclose(ours, plain, atol=1e-4)
    assert pipe.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"].__class__ \
        is not Probe


def test_a_background_lora_alone_is_the_lora_alone():
    pipe = fresh_pipeline()
    make_lora(pipe, "cross", seed=3)
    pipe.unet.set_adapters(["cross"])
    alone = generate(pipe, prompt="cross left")
    with compose(pipe, ["cross"], "lora_composer", prompt="cross left", layout=[(0, 0, 32, 32)]) as s:
        ours = generate(pipe, prompt="cross left")
    torch.testing.assert_close(ours, alone, rtol=0, atol=2e-5)
    assert s.evaluations == 3  # no region: no refinement, no re-initialisation


def test_refusals(loaded):
    pipe, names = loaded
    with pytest.raises(ValueError, match="needs a layout"):
        with compose(pipe, names, "lora_composer", prompt=PROMPT):
            pass
    with pytest.raises(ValueError, match=r"layout box 2 \(16,0,40,32\) is outside the 32x32 image"):
        with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, (16, 0, 40, 32)]):
            pass
    with pytest.raises(ValueError, match="1 layout boxes for 2 LoRAs"):
        with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT]):
            pass
    assert "forward" not in vars(pipe.unet) and type(next(iter(pipe.unet.attn_processors.values()))) is not Probe
    with pytest.raises(ValueError, match="covers no cell of the 8x8 attention grid"):
        cells((0, 0, 3, 32), (32, 32), (8, 8))
    assert cells((1, 2, 17, 31), (32, 32), (8, 8)) == (1, 1, 7, 4)  # ceil the start, floor the end
    with pytest.raises(ValueError, match="concept word 'yellow' is not in the prompt 'cross left'"):
        with compose(pipe, names, "lora_composer", prompt="cross left", layout=[LEFT, RIGHT]):
            pass
