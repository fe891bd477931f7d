"""AutoLoRA gated fusion against independent references (diffusers' set_adapters, per-module PEFT scalings), its
training, its file and its refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusion_testbed import fresh_pipeline, make_lora, unet_inputs

from lorakit.cli import main
from lorakit.diffusion import compose
from lorakit.diffusion.autolora import gated
from lorakit.diffusion.gates import Gates, load_gates, time_features
from lorakit.diffusion.autolora_train import gated_loss, scenes_for, train_gates

NAMES = ["cross", "yellow"]
PROMPT = "yellow cross left"


def two_loras():
    pipe = fresh_pipeline()
    for i, name in enumerate(NAMES):
        make_lora(pipe, name, seed=10 + i)
    return pipe


def generate(pipe, steps=3):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images


def fixed_gates(pipe, logits, w=1.0) -> Gates:
    """Gates whose weight for LoRA i is w * sigmoid(logits[i]) at every module, token and step."""
    gates = Gates.for_denoiser(pipe.unet, NAMES)
    with torch.no_grad():
        for g in gates.gates.values():
            g.w.fill_(w)
            g.lora.copy_(torch.tensor(logits, dtype=torch.float32))
    return gates


@pytest.mark.parametrize("hot", [0, 1])
def test_one_hot_gates_equal_the_single_lora(hot):
    pipe = two_loras()
    weights = [0.7, 1.3]
    gates = fixed_gates(pipe, [40.0 if i == hot else -40.0 for i in range(2)])  # sigmoid: 1 and 4e-18
    with compose(pipe, NAMES, "autolora", weights, gates=gates) as stats:
        ours = generate(pipe)
    pipe.unet.set_adapters([NAMES[hot]], [weights[hot]])
    alone = generate(pipe)
    pipe.unet.set_adapters(NAMES, weights)
    both = generate(pipe)
    torch.testing.assert_close(ours, alone, rtol=0, atol=1e-5)
    assert (ours - both).abs().max() > 1e-2  # the other LoRA does change the image: the gate removed it
    assert stats.evaluations == 3


def test_constant_gates_equal_the_weighted_merge():
    pipe = two_loras()
    weights, shares = [0.7, 1.3], [0.25, 0.6]
    gates = fixed_gates(pipe, [math.log(s / (1 - s)) for s in shares])
    with compose(pipe, NAMES, "autolora", weights, gates=gates):
        ours = generate(pipe)
    pipe.unet.set_adapters(NAMES, [w * s for w, s in zip(weights, shares)])
    torch.testing.assert_close(ours, generate(pipe), rtol=0, atol=1e-5)
    untrained = Gates.for_denoiser(pipe.unet, NAMES)  # u = v = P = c = 0, w = 2: the merge at the given weights
    with compose(pipe, NAMES, "autolora", weights, gates=untrained):
        ours = generate(pipe)
    pipe.unet.set_adapters(NAMES, weights)
    torch.testing.assert_close(ours, generate(pipe), rtol=0, atol=1e-5)


def test_weights_differ_per_layer_and_timestep_as_the_gate_says():
    """Per module and timestep weights against PEFT's own forward with each module's scaling set by hand."""
    pipe = two_loras()
    gates = Gates.for_denoiser(pipe.unet, NAMES)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.w.fill_(1.0)
            gate.lora.copy_(torch.empty(2).uniform_(-3, 3, generator=g))
            gate.time.copy_(torch.randn(1, gate.time.shape[1], generator=g).expand_as(gate.time))  # same per channel
    x, _, c = unet_inputs()
    layers = {n: m for n, m in pipe.unet.named_modules() if n in gates.layers}
    pipe.unet.set_adapters(NAMES, [1.0, 1.0])
    base_scaling = {n: dict(m.scaling) for n, m in layers.items()}
    outputs, shares = {}, {}
    for t in (torch.tensor(100), torch.tensor(800)):
        with torch.no_grad(), gated(pipe.unet, gates, NAMES, lambda: t.flatten()):
            ours = pipe.unet(x, t, encoder_hidden_states=c).sample
        phi = time_features(t.flatten())[0]
        for n, m in layers.items():
            gate = gates.gate(n)
            for i, a in enumerate(NAMES):
                share = float(torch.sigmoid(gate.lora[i] + gate.time[0] @ phi).detach())
                shares[n, a, int(t)] = share
                m.scaling[a] = base_scaling[n][a] * share
        with torch.no_grad():
            outputs[int(t)] = pipe.unet(x, t, encoder_hidden_states=c).sample
        for n, m in layers.items():
            m.scaling.update(base_scaling[n])
        torch.testing.assert_close(ours, outputs[int(t)], rtol=0, atol=1e-5)
    per_layer = np.array([[shares[n, a, 100] for a in NAMES] for n in layers])
    per_step = np.array([[shares[n, a, 100] - shares[n, a, 800] for a in NAMES] for n in layers])
    assert per_layer.std(0).min() > 0.2 and np.abs(per_step).mean() > 0.05  # a global gate would fail the match


def test_learned_gate_varies_with_the_activations():
    pipe = two_loras()
    gates = Gates.for_denoiser(pipe.unet, NAMES)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.u.normal_(0, 1)
            gate.v.normal_(0, 1)
    seen = []
    layer = next(iter(gates.layers))
    hook = gates.gate(layer).register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    x, t, c = unet_inputs()
    pipe.unet.set_adapters(NAMES, [1.0, 1.0])
    with torch.no_grad(), gated(pipe.unet, gates, NAMES, lambda: t.flatten()):
        pipe.unet(x, t, encoder_hidden_states=c)
    hook.remove()
    w = seen[0]  # (LoRAs, batch, ..., channels)
    assert w[0].std() > 0.05 and (w[0] - w[1]).abs().mean() > 0.05  # per token/channel and per LoRA, not one number


def test_gate_training_lowers_its_loss():
    pipe = two_loras()
    rng = np.random.default_rng(5)
    scenes, prompts = scenes_for(rng, NAMES, 16, empty=0.0)

    def held_out(gates):
        with torch.no_grad():
            return float(gated_loss(pipe, gates, NAMES, scenes, prompts, torch.Generator().manual_seed(9)))

    untrained = Gates.for_denoiser(pipe.unet, NAMES)
    before = held_out(untrained)
    trained, losses = train_gates(pipe, NAMES, steps=8, batch=4, lr=5e-2, seed=1)
    after = held_out(trained)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert after < before - 0.01, (before, after)
    assert not all(torch.equal(p, q) for p, q in zip(trained.parameters(), untrained.parameters()))


def test_gates_file_round_trips_and_refuses_other_loras_and_networks(tmp_path):
    pipe = two_loras()
    gates = Gates.for_denoiser(pipe.unet, NAMES)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    path = gates.save(tmp_path / "gates.safetensors")
    loaded = load_gates(path)
    assert loaded.layers == gates.layers and loaded.loras == gates.loras
    for a, b in zip(gates.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with compose(pipe, NAMES, "autolora", gates=gates):
        direct = generate(pipe)
    with compose(pipe, NAMES, "autolora", gates=str(path)):
        from_file = generate(pipe)
    torch.testing.assert_close(direct, from_file, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="exists"):
        gates.save(path)

    other = fresh_pipeline()  # same network, a "cross" LoRA with other weights
    make_lora(other, "cross", seed=99)
    make_lora(other, "yellow", seed=11)
    with pytest.raises(ValueError, match=r"trained for the LoRAs cross \(\w+\), yellow \(\w+\); LoRA 'cross' \(\w+\) is "
                                         r"not one of them"):
        with compose(other, NAMES, "autolora", gates=str(path)):
            generate(other)

    from diffusers import UNet2DConditionModel

    other.unet = UNet2DConditionModel(sample_size=16, in_channels=12, out_channels=12, layers_per_block=1,
                                      block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                      attention_head_dim=8, norm_num_groups=8)
    make_lora(other, "cross", seed=10)
    make_lora(other, "yellow", seed=11)
    with pytest.raises(ValueError, match="made for another network: module '.*' has 16 output channels, the gate 32"):
        with compose(other, NAMES, "autolora", gates=str(path)):
            pass
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_gates(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="autolora needs trained gates"):
        with compose(pipe, NAMES, "autolora"):
            pass


def test_cli_trains_gates_and_generates_with_them(lora_files, tmp_path, capsys):
    from PIL import Image

    root, files = lora_files
    gates = tmp_path / "gates.safetensors"
    loras = ["--lora", str(files["cross"]), "--lora", str(files["yellow"])]
    code = main(["diffuse-gates", "--model", str(root / "model"), *loras, "--steps", "2", "--batch", "2",
                 "-o", str(gates)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 LoRAs" in captured.out and "AutoLoRA gates" in captured.err  # the progress bar
    out = tmp_path / "out.png"
    code = main(["diffuse", "--model", str(root / "model"), *loras, "--method", "autolora", "--gates", str(gates),
                 "--prompt", PROMPT, "--steps", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Image.open(out).size == (32, 32) and "2 denoiser evaluations" in captured.out
    for argv, message in [
        (["diffuse", "--model", str(root / "model"), "--lora", str(files["cross"]), "--lora", str(files["yellow"]),
          "--method", "autolora", "--prompt", PROMPT, "-o", str(tmp_path / "a.png")], "autolora needs trained gates"),
        (["diffuse", "--model", str(root / "model"), "--lora", str(files["yellow"]), "--lora", str(files["cross"]),
          "--method", "autolora", "--gates", str(tmp_path / "none.safetensors"), "--prompt", PROMPT, "-o",
          str(tmp_path / "a.png")], "no gates file"),
        (["diffuse-gates", "--model", str(root / "model"), *loras, "-o", str(gates)], "exists"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_gates_refuse_modules_without_a_gate_and_honour_disabled_adapters():
    narrow = fresh_pipeline()  # LoRAs on the attention queries only: gates for those modules alone
    for i, name in enumerate(NAMES):
        make_lora(narrow, name, seed=10 + i, targets=["to_q"])
    gates = Gates.for_denoiser(narrow.unet, NAMES)
    assert gates.layers and all(n.endswith("to_q") for n in gates.layers)
    pipe = two_loras()
    with pytest.raises(ValueError, match="made for another network: it has no gate for module '.*conv1'"):
        gates.check(pipe.unet, NAMES)
    x, t, c = unet_inputs()
    full = Gates.for_denoiser(pipe.unet, NAMES)
    with torch.no_grad():
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, encoder_hidden_states=c).sample
        with gated(pipe.unet, full, NAMES, lambda: t.flatten()):
            ours = pipe.unet(x, t, encoder_hidden_states=c).sample
        pipe.unet.enable_adapters()
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
