"""Composition methods against independent references: fused weights, per-LoRA predictions, the official schedules."""
from __future__ import annotations

import pytest
import torch
from diffusion_testbed import fresh_pipeline, unet_inputs

from lorakit.diffusion import COMPOSERS, check_layout, check_prompt, compose, read_lora
from lorakit.diffusion.cmlora import high_frequency_share, refresh_steps
from lorakit.diffusion.switch import Switch

PROMPT = "yellow cross left"


def generate(pipe, steps=4, seed=0):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def eps_alone(pipe, names, weights, x, t, c):
    """The UNet's prediction with exactly ``names`` active at ``weights`` (diffusers' own adapter API)."""
    pipe.unet.set_adapters(names, weights)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=c).sample


def fused_unet(pipe, files, weights):
    """The base UNet with sum_i w_i * (alpha/r) * B_i A_i added to its weights, from the files alone."""
    base = fresh_pipeline()
    modules = dict(base.unet.named_modules())
    for path, w in zip(files, weights):
        state = read_lora(base, path)
        for key in [k for k in state if k.endswith(".lora_A.weight")]:
            a, b = state[key], state[key.replace("lora_A", "lora_B")]
            layer = modules[key[len("unet."):-len(".lora_A.weight")]]
            delta = (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape) if a.dim() == 2 else \
                torch.einsum("or,rikl->oikl", b.flatten(1), a)
            with torch.no_grad():
                layer.weight += w * (4 / 2) * delta  # lora_alpha 4, r 2 in the test LoRAs
    return base


def test_merge_equals_fused_weights_and_set_adapters(lora_files, loaded):
    pipe, names = loaded
    weights = [0.7, 1.3]
    with compose(pipe, names, "merge", weights) as stats:
        ours = generate(pipe)
    pipe.unet.set_adapters(names, weights)
    plain = generate(pipe)  # diffusers' set_adapters with the same weights, no lorakit in the loop
    fused = fused_unet(pipe, [lora_files[1][n] for n in names], weights)
    reference = generate(fused)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-4)
    assert stats.evaluations == 4 and stats.steps == 4


def test_switch_one_lora_per_step_on_the_official_schedule(loaded):
    pipe, names = loaded
    with compose(pipe, names, "switch", every=2) as stats:
        ours = generate(pipe, steps=6)
    active = [c[1] for c in stats.calls]
    assert active == [("cross",)] * 3 + [("yellow",)] * 2 + [("cross",)]  # switch after steps 2 and 4
    assert [Switch(names, every=5).active(k) for k in range(12)] == [0] * 6 + [1] * 5 + [0]

    def official(pipeline, i, t, kwargs):  # the official callback: at the end of step i > 0 with i % every == 0
        if i > 0 and i % 2 == 0:
            current = pipeline.unet.active_adapters()[0]
            pipeline.unet.set_adapters([names[(names.index(current) + 1) % 2]])
        return kwargs

    pipe.unet.set_adapters([names[0]])
    reference = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt",
                     callback_on_step_end=official).images
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_composite_is_the_mean_of_per_lora_predictions(loaded):
    pipe, names = loaded
    x, t, c = unet_inputs()
    weights = [1.0, 0.5]
    separate = [eps_alone(pipe, [n], [w], x, t, c) for n, w in zip(names, weights)]
    with compose(pipe, names, "composite", weights) as stats:
        with torch.no_grad():
            ours = pipe.unet(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(ours, (separate[0] + separate[1]) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(separate[0], separate[1], atol=1e-3)
    both = eps_alone(pipe, names, weights, x, t, c)
    assert not torch.allclose(ours, both, atol=1e-4)  # averaging predictions is not merging weights
    assert stats.evaluations == 2


def test_composite_costs_one_evaluation_per_lora_per_step(loaded):
    pipe, names = loaded
    with compose(pipe, names, "composite") as stats:
        generate(pipe, steps=3)
        generate(pipe, steps=3)
    assert stats.generations == 2 and stats.evaluations == 2 * 3 * 2


def test_cmlora_uncached_is_the_dominant_weighted_sum(loaded):
    pipe, names = loaded
    x, t, c = unet_inputs()
    with compose(pipe, names, "cmlora", cache=False) as stats:
        with torch.no_grad():
            ours = pipe.unet(x, t, encoder_hidden_states=c).sample
    pipe.unet.disable_adapters()
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=c).sample
    pipe.unet.enable_adapters()
    eps = [eps_alone(pipe, [n], [1.0], x, t, c) for n in names]
    share = [high_frequency_share(e - base) for e in eps]
    dominant = max(range(2), key=lambda i: share[i])
    d = 2 - 0.5  # the official dom_lora_coeff for N = 2
    want = sum((d if i == dominant else 1) / (d + 1) * eps[i] for i in range(2))
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    assert stats.evaluations == 3  # base (ordering) + one per LoRA


def test_cmlora_caching_saves_evaluations_of_non_dominant_loras(loaded):
    pipe, names = loaded
    with compose(pipe, names, "cmlora") as cached:
        generate(pipe, steps=8)
    with compose(pipe, names, "cmlora", cache=False) as full:
        generate(pipe, steps=8)
    refresh = refresh_steps(8)
    assert refresh == {0, 2, 3, 6, 7}  # every 2nd below int(0.375*8)=3, every 3rd below 7, then every 2nd
    assert full.evaluations == 1 + 2 * 8
    assert cached.evaluations == 1 + 2 + sum(1 + (k in refresh) for k in range(1, 8))
    per_step = {}
    for step, active, _ in cached.calls:
        per_step.setdefault(step, []).append(active)
    assert all(len(a) == 1 for calls in per_step.values() for a in calls if a)  # one LoRA per evaluation


def test_cmlora_cache_is_kept_per_call_within_a_step(loaded):
    """Two calls per step (guidance branches run separately) give what each gives alone: no shared cache."""
    pipe, names = loaded
    (xa, _, ca), (xb, _, cb) = unet_inputs(1, seed=1), unet_inputs(1, seed=2)
    steps = [torch.tensor(t) for t in (900, 800, 700, 600)]

    def run(pairs):
        outs = []
        with compose(pipe, names, "cmlora", every=1):
            for t in steps:
                with torch.no_grad():
                    outs.append([pipe.unet(x, t, encoder_hidden_states=c).sample for x, c in pairs])
        return outs

    both, alone_a, alone_b = run([(xa, ca), (xb, cb)]), run([(xa, ca)]), run([(xb, cb)])
    for k in range(len(steps)):
        torch.testing.assert_close(both[k][0], alone_a[k][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(both[k][1], alone_b[k][0], rtol=0, atol=1e-6)


def test_high_frequency_share():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    assert high_frequency_share(checker[None]) == pytest.approx(1.0)
    assert high_frequency_share(torch.ones(1, 16, 16)) == pytest.approx(0.0)


def test_errors(loaded):
    pipe, names = loaded
    with pytest.raises(KeyError, match="unknown composition method 'blend'.*merge"):
        with compose(pipe, names, "blend"):
            pass
    with pytest.raises(KeyError, match="'style' is not loaded"):
        with compose(pipe, ["style"], "merge"):
            pass
    with pytest.raises(ValueError, match="takes no layout"):
        with compose(pipe, names, "merge", layout=[(0, 0, 8, 8), (8, 8, 16, 16)]):
            pass
    with pytest.raises(TypeError, match="no option 'evry'"):
        with compose(pipe, names, "switch", evry=2):
            pass
    with pytest.raises(ValueError, match="2 LoRAs but 3 weights"):
        with compose(pipe, names, "merge", [1, 1, 1]):
            pass
    with pytest.raises(ValueError, match="3 LoRAs but the prompt 'cross left' has 2 token"):
        check_prompt(pipe, "cross left", 3)
    with pytest.raises(ValueError, match=r"layout box 2 \(20,0,40,10\) is outside the 32x32 image"):
        check_layout([(0, 0, 16, 16), (20, 0, 40, 10)], 2)
    assert check_layout([(0, 0, 16, 16)], 1) == [(0, 0, 16, 16)]


def test_the_denoiser_is_restored_after_the_block(loaded):
    pipe, names = loaded
    x, t, c = unet_inputs()
    with compose(pipe, names, "switch"):
        pass
    assert "forward" not in vars(pipe.unet)
    assert {"autolora", "clora", "cmlora", "composite", "lora_composer", "merge", "switch"} <= set(COMPOSERS.names())
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample, eps_alone(pipe, names, [1, 1], x, t, c))
