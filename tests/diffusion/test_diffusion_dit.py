"""Every composition method on diffusion transformers, through diffusers' own pipelines built tiny from configs:
PixArt-alpha (cross-attention DiT, DDIM; its transformer has no diffusers LoRA support, so lorakit adds it with the
functions diffusers' mixin uses) and Stable Diffusion 3 (joint attention, flow-matching Euler, diffusers' loader)."""
from __future__ import annotations

import math

import pytest
import torch

from lorakit.diffusion import compose, load_loras, save_lora
from lorakit.diffusion.adapters import activate
from lorakit.diffusion.attention import Probe
from lorakit.diffusion.gates import Gates
from lorakit.diffusion.tiny import BUILDERS, add_random_loras, build_flux, generate_kwargs

NAMES = ["cross", "yellow"]
PROMPT = "yellow cross"
LEFT, CORNER = (0, 0, 8, 16), (8, 8, 16, 16)  # pixels of the 16x16 image; on the 4x4 token grid: columns 0-1, and
# rows 2-3 x columns 2-3


def make_loras(pipe, kind: str) -> None:
    add_random_loras(pipe, kind, NAMES)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def dit_files(request, tmp_path_factory):
    """(kind, the pipeline the LoRAs were made in, their files, the saved base pipeline's directory)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    BUILDERS[kind][0]().save_pretrained(root / "model")
    maker = BUILDERS[kind][0]()
    make_loras(maker, kind)
    files = [save_lora(maker, name, root / name) for name in NAMES]
    return kind, maker, files, root / "model"


@pytest.fixture
def dit(dit_files):
    kind, _, files, _ = dit_files
    pipe = BUILDERS[kind][0]()
    return pipe, load_loras(pipe, files)


def generate(pipe, prompt=PROMPT, steps=3, **kw):
    extra = {"clean_caption": False} if "PixArt" in type(pipe).__name__ else {}
    return pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", **generate_kwargs(pipe), **extra, **kw).images


def with_forward(pipe, make):
    """Generate with the transformer's forward replaced by ``make(original)``: a hand-built reference."""
    original = pipe.transformer.forward
    pipe.transformer.forward = make(original)
    try:
        return generate(pipe)
    finally:
        del pipe.transformer.forward


def test_lora_files_load_as_made_and_as_diffusers_loads_them(dit_files, dit):
    kind, maker, files, _ = dit_files
    pipe, names = dit
    for name in names:
        activate(maker.transformer, [name])
        activate(pipe.transformer, [name])
        torch.testing.assert_close(generate(pipe), generate(maker), rtol=0, atol=1e-6)
    activate(pipe.transformer, [])
    assert not torch.allclose(generate(pipe), generate(maker), atol=1e-3)  # the LoRA matters
    if hasattr(pipe, "load_lora_weights"):  # SD3: diffusers' own loader, no lorakit on the way
        plain = BUILDERS[kind][0]()
        plain.load_lora_weights(str(files[0].parent), weight_name=files[0].name, adapter_name="cross")
        activate(maker.transformer, ["cross"])
        torch.testing.assert_close(generate(plain), generate(maker), rtol=0, atol=1e-6)


def test_merge_switch_composite_against_hand_built_references(dit):
    pipe, names = dit
    with compose(pipe, names, "merge", [0.5, 1.5]) as stats:
        merged = generate(pipe)
    activate(pipe.transformer, names, [0.5, 1.5])
    torch.testing.assert_close(merged, generate(pipe), rtol=0, atol=1e-6)
    assert stats.evaluations == 3

    def mean_of_loras(original):
        def forward(*a, **k):
            outs = []
            for name in names:
                activate(pipe.transformer, [name])
                outs.append(original(*a, **{**k, "return_dict": False})[0])
            return (torch.stack(outs).mean(0),)
        return forward

    with compose(pipe, names, "composite") as stats:
        ours = generate(pipe)
    torch.testing.assert_close(ours, with_forward(pipe, mean_of_loras), rtol=0, atol=1e-6)
    assert stats.evaluations == 6

    def cycling(original):
        calls = []

        def forward(*a, **k):
            activate(pipe.transformer, [names[(max(len(calls) - 1, 0) // 1) % 2]])  # every=1: a, a, b
            calls.append(1)
            return original(*a, **{**k, "return_dict": False})
        return forward

    with compose(pipe, names, "switch", every=1) as stats:
        ours = generate(pipe)
    assert [c[1] for c in stats.calls] == [("cross",), ("cross",), ("yellow",)]
    torch.testing.assert_close(ours, with_forward(pipe, cycling), rtol=0, atol=1e-6)
    with compose(pipe, names, "cmlora", cache=False) as stats:
        generate(pipe)
    assert stats.evaluations == 1 + 3 * 2  # the base once for the frequency order, then every LoRA at every step


def test_clora_masks_fuse_predictions_and_its_step_lowers_the_loss(dit):
    pipe, names = dit
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0, threshold=2.0):  # no LoRA mask: the base
        base_only = generate(pipe)
    activate(pipe.transformer, [])
    torch.testing.assert_close(base_only, generate(pipe), rtol=0, atol=1e-5)
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0, threshold=0.0):  # every mask full: LoRA mean
        full = generate(pipe)
    with compose(pipe, names, "composite"):
        torch.testing.assert_close(full, generate(pipe), rtol=0, atol=1e-5)
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0.5, refine_at="0", refine_iters=3,
                 until=0.01) as stats:
        moved = generate(pipe, steps=2)
    losses = [loss for _, loss in stats.composer.losses]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert not torch.allclose(moved, generate(pipe, steps=2), atol=1e-4)


def _attention_layer(pipe):
    """The first block's cross-attention (PixArt) or joint attention (SD3) layer, and whether it is joint."""
    block = pipe.transformer.transformer_blocks[0]
    return (block.attn, True) if hasattr(block, "context_pre_only") else (block.attn2, False)


def where_boxes() -> torch.Tensor:
    """Per token of the 4x4 grid: 1 in LEFT only, 2 in CORNER only, 3 in both, 0 in neither."""
    where = torch.zeros(4, 4, dtype=torch.int)
    where[:, 0:2] += 1
    where[2:4, 2:4] += 2
    return where.flatten()


def test_lora_composer_injects_inside_the_boxes_only_and_isolates_them(dit):
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    pipe, names = dit
    layer, joint = _attention_layer(pipe)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, layer.query_dim, generator=g)  # the 4x4 token grid
    width = layer.add_k_proj.in_features if joint else layer.to_k.in_features
    context = torch.randn(2, 5, width, generator=g)
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, CORNER]) as stats:
        composer = stats.composer
        activate(pipe.transformer, [])  # no background LoRA: the base wherever no box is
        composer.sample, composer.recording, composer.store = torch.zeros(2, 4, 8, 8), True, {}
        with torch.no_grad():
            ours = Probe(composer)(layer, hidden, context)
            plain = (JointAttnProcessor2_0() if joint else AttnProcessor2_0())(layer, hidden, context)
            activate(pipe.transformer, ["cross"])  # by hand: LoRA "cross" on the text keys/values and output
            heads = layer.head_to_batch_dim
            q = heads(layer.to_q.base_layer(hidden))
            if joint:
                k = torch.cat([heads(layer.to_k.base_layer(hidden)), heads(layer.add_k_proj(context))], 1)
                v = torch.cat([heads(layer.to_v.base_layer(hidden)), heads(layer.add_v_proj(context))], 1)
            else:
                k, v = heads(layer.to_k(context)), heads(layer.to_v(context))
            scores = torch.bmm(q, k.transpose(1, 2)) * layer.scale
            if joint:  # image keys in the other box are hidden from a box's queries (isolation)
                box = where_boxes()
                apart = (box[:, None] > 0) & (box[None, :] > 0) & (box[:, None] != box[None, :])
                scores[:, :, :16] = scores[:, :, :16].masked_fill(apart, float("-inf"))
            probs = scores.softmax(-1)
            injected = layer.to_out[0](layer.batch_to_head_dim(torch.bmm(probs, v)))
        composer.recording = False
    if joint:
        torch.testing.assert_close(ours[1], plain[1], rtol=0, atol=1e-6)  # the text stream is untouched
        ours, plain = ours[0], plain[0]
    where = where_boxes()
    torch.testing.assert_close(ours[:, where == 0], plain[:, where == 0], rtol=0, atol=1e-6)  # nothing injected
    torch.testing.assert_close(ours[:, where == 1], injected[:, where == 1], rtol=0, atol=1e-5)
    assert not torch.allclose(ours[:, where == 1], plain[:, where == 1], atol=1e-4)
    if joint:  # the joint layer is also the self-attention: queries in one box see no key of the other
        seen = composer.store[False, (4, 4)][0]  # (batch, heads, 16, 16)
        assert float(seen[:, :, where == 1][..., where == 2].abs().max()) < 1e-12
        assert float(seen[:, :, where == 0][..., where == 2].min()) > 0  # outside every box: all visible


def test_lora_composer_self_attention_isolation_on_pixart(dit):
    pipe, names = dit
    if _attention_layer(pipe)[1]:
        pytest.skip("joint attention: covered above")
    layer = pipe.transformer.transformer_blocks[0].attn1
    hidden = torch.randn(2, 16, layer.query_dim, generator=torch.Generator().manual_seed(2))
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, CORNER]) as stats:
        composer = stats.composer
        composer.sample, composer.recording, composer.store = torch.zeros(2, 4, 8, 8), True, {}
        with torch.no_grad():
            Probe(composer)(layer, hidden)
    seen = composer.store[False, (4, 4)][0]
    where = where_boxes()
    assert float(seen[:, :, where == 1][..., where == 2].abs().max()) < 1e-12
    assert float(seen[:, :, where == 2][..., where == 1].abs().max()) < 1e-12


def test_lora_composer_generates_and_refines_on_a_dit(dit):
    pipe, names = dit
    with compose(pipe, names, "lora_composer", prompt=PROMPT, layout=[LEFT, CORNER]) as stats:
        boxed = generate(pipe)
    assert torch.isfinite(boxed).all() and stats.evaluations == 3 + 2 + 1  # re-init at step 0, refining 0 and 1


@pytest.mark.parametrize("hot", [0, 1])
def test_autolora_one_hot_gates_are_one_lora_and_constant_gates_the_merge(dit, hot):
    pipe, names = dit
    weights = [0.7, 1.3]
    gates = Gates.for_denoiser(pipe.transformer, names)
    with torch.no_grad():
        for g in gates.gates.values():
            g.w.fill_(1.0)
            g.lora.copy_(torch.tensor([40.0 if i == hot else -40.0 for i in range(2)]))
    with compose(pipe, names, "autolora", weights, gates=gates):
        ours = generate(pipe)
    activate(pipe.transformer, [names[hot]], [weights[hot]])
    torch.testing.assert_close(ours, generate(pipe), rtol=0, atol=1e-5)
    shares = [0.25, 0.6]
    with torch.no_grad():
        for g in gates.gates.values():
            g.lora.copy_(torch.tensor([math.log(s / (1 - s)) for s in shares]))
    with compose(pipe, names, "autolora", weights, gates=gates):
        ours = generate(pipe)
    activate(pipe.transformer, names, [w * s for w, s in zip(weights, shares)])
    torch.testing.assert_close(ours, generate(pipe), rtol=0, atol=1e-5)


def test_lora_for_a_wider_dit_names_the_shapes(dit_files, tmp_path):
    kind, maker, _, _ = dit_files
    config = dict(maker.transformer.config)
    config.update(num_attention_heads=3, **({"caption_projection_dim": 24} if kind == "sd3" else {}))
    wide = type(maker)(**{**BUILDERS[kind][0]().components, "transformer": type(maker.transformer)(**config)})
    add_random_loras(wide, kind, ["alien"])
    path = save_lora(wide, "alien", tmp_path / "alien")
    pipe = BUILDERS[kind][0]()
    with pytest.raises(ValueError, match=r"another network: transformer_blocks\.0\..* has shape \(2, 24\) \(input 24\)"
                                         r", the network's .* \(input 16\)"):
        load_loras(pipe, [path])
    assert not (getattr(pipe.transformer, "peft_config", None) or {})  # refused before anything was loaded


def test_gate_training_refuses_a_dit(dit):
    from lorakit.diffusion.autolora_train import train_gates

    pipe, names = dit
    with pytest.raises(ValueError, match="testbed's concept scenes"):
        train_gates(pipe, names, steps=1)


def test_flux_composes_with_the_methods_that_leave_attention_alone():
    pipe = build_flux()
    add_random_loras(pipe, "flux", NAMES)
    size = {"height": 16, "width": 16, "max_sequence_length": 8}
    with compose(pipe, NAMES, "merge", [0.5, 1.5]):
        merged = generate(pipe, **size)
    activate(pipe.transformer, NAMES, [0.5, 1.5])
    torch.testing.assert_close(merged, generate(pipe, **size), rtol=0, atol=1e-6)
    with compose(pipe, NAMES, "composite") as stats:
        ours = generate(pipe, **size)
    outs = []
    for name in NAMES:  # one Euler step is linear in the prediction: the step from the mean is the mean step
        activate(pipe.transformer, [name])
        outs.append(generate(pipe, steps=1, **size))
    with compose(pipe, NAMES, "composite"):
        torch.testing.assert_close(generate(pipe, steps=1, **size), torch.stack(outs).mean(0), rtol=0, atol=1e-5)
    assert stats.evaluations == 6 and not torch.allclose(ours, merged, atol=1e-4)
    with compose(pipe, NAMES, "switch", every=1) as stats:
        switched = generate(pipe, **size)
    assert [c[1] for c in stats.calls] == [("cross",), ("cross",), ("yellow",)] and torch.isfinite(switched).all()
    with compose(pipe, NAMES, "autolora", gates=Gates.for_denoiser(pipe.transformer, NAMES)):  # untrained: merge
        torch.testing.assert_close(generate(pipe, **size), generate_merged(pipe, size), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="packed tokens without an image grid"):
        with compose(pipe, NAMES, "cmlora"):
            generate(pipe, **size)
    with pytest.raises(ValueError, match="FluxAttention, not diffusers' Attention"):
        with compose(pipe, NAMES, "clora", prompt=PROMPT):
            pass


def generate_merged(pipe, size):
    activate(pipe.transformer, NAMES, [1.0, 1.0])
    return generate(pipe, **size)


def test_denoisers_the_probes_cannot_read_are_refused():
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    from lorakit.diffusion.attention import check_attention

    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8])
    with pytest.raises(ValueError, match="FluxAttention, not diffusers' Attention"):
        check_attention(flux, "clora")
    dit = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, out_channels=4)
    with pytest.raises(ValueError, match="no cross-attention or joint text-image attention"):
        check_attention(dit, "lora_composer")


def _diffuse(capsys, *argv):
    from lorakit.cli import main

    code = main(["diffuse", *map(str, argv)])
    return code, capsys.readouterr()


def test_diffuse_command_on_a_dit_directory(dit_files, tmp_path, capsys):
    from PIL import Image

    _, _, files, model = dit_files
    out = tmp_path / "out.png"
    code, captured = _diffuse(capsys, "--model", model, "--lora", files[0].parent, "--lora", files[1].parent,
                              "--method", "lora_composer", "--layout", "0,0,8,16;8,0,16,16", "--prompt", PROMPT,
                              "--steps", 2, "-o", out)
    assert code == 0, captured.err
    assert Image.open(out).size == (16, 16) and "lora_composer, 2 LoRAs" in captured.out


@pytest.mark.parametrize("extra, message", [
    (["--method", "blend"], "unknown composition method 'blend'"),
    (["--prompt", "cross"], "2 LoRAs but the prompt 'cross' has 1 token"),
    (["--method", "lora_composer", "--layout", "0,0,8,16;8,0,17,16"], "layout box 2 (8,0,17,16) is outside the 16x16"),
    (["--unet-lora"], "LoRA made for another network: no tensors for a transformer"),
])
def test_diffuse_user_errors_on_a_dit(dit_files, lora_files, tmp_path, capsys, extra, message):
    _, _, files, model = dit_files
    loras = [files[0].parent, files[1].parent]
    if extra == ["--unet-lora"]:  # a LoRA of the testbed's UNet given to a transformer
        loras, extra = [lora_files[1]["cross"], files[1].parent], []
    argv = ["--model", model, "--lora", loras[0], "--lora", loras[1], "--prompt", PROMPT, "-o", tmp_path / "o.png"]
    code, captured = _diffuse(capsys, *argv, *extra)
    assert code == 2 and message in captured.err and "Traceback" not in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1
