"""CLoRA: the contrastive loss, its latent step, the attention masks and their fusion, reductions, refusals."""
from __future__ import annotations

import math

import pytest
import torch
from diffusion_testbed import fresh_pipeline, make_lora

from lorakit.diffusion import compose
from lorakit.diffusion.clora import CLoRA, nt_xent

PROMPT = "yellow cross left"


def generate(pipe, steps=3, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_nt_xent_against_the_pairwise_formula():
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.rand(6, 10, generator=g), torch.tensor([0, 1, 0, 2, 1, 0])
    z = emb / emb.norm(dim=1, keepdim=True)
    terms = []
    for a in range(6):
        for p in range(6):
            if a != p and labels[a] == labels[p]:
                neg = sum(math.exp(float(z[a] @ z[n]) / 0.5) for n in range(6) if labels[n] != labels[a])
                pos = math.exp(float(z[a] @ z[p]) / 0.5)
                terms.append(-math.log(pos / (pos + neg)))
    assert float(nt_xent(emb, labels, 0.5)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(nt_xent(emb, torch.zeros(6, dtype=torch.long))) == 0.0  # one concept: nothing to push apart
    assert float(nt_xent(emb, torch.arange(6))) == 0.0  # no positive pair


def test_masks_cover_every_cell_and_follow_the_threshold():
    clora = CLoRA(["a", "b"], threshold=0.5)
    clora.tokens = [[[1], [2]]]
    maps = torch.zeros(3, 1, 4, 3)  # branches (base, a, b), images, 2x2 cells, tokens
    maps[1, 0, :, 1] = torch.tensor([1.0, 0.6, 0.4, 0.0])  # a's token in a's branch: cells 0 and 1 over 0.5
    maps[2, 0, :, 2] = torch.tensor([0.0, 0.9, 1.0, 0.1])  # b's token in b's branch: cells 1 and 2
    masks = clora.masks(list(maps), (2, 2), (2, 2))
    assert masks.shape == (3, 1, 2, 2)
    assert masks[:, 0].flatten(1).tolist() == [[0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]]
    weights = masks / masks.sum(0)  # the fusion weights: a partition of unity over the branches
    torch.testing.assert_close(weights.sum(0), torch.ones(1, 2, 2))


@pytest.mark.parametrize("threshold, branches", [(0.0, ["cross", "yellow"]), (2.0, [""])])
def test_fusion_is_the_mask_weighted_mean_of_branch_predictions(loaded, threshold, branches):
    """LoRA masks covering all average the LoRAs (the base only fills uncovered cells); empty ones leave the base."""
    pipe, names = loaded
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0, threshold=threshold) as stats:
        ours = generate(pipe, steps=2)
    assert stats.composer.losses == [] and stats.evaluations == 2 * 3

    class Mean(torch.nn.Module):  # the reference: each branch through diffusers' own adapter switch
        def forward(self, *a, **k):
            outs = []
            for b in branches:
                if b:
                    pipe.unet.enable_adapters()
                    pipe.unet.set_adapters([b])
                else:
                    pipe.unet.disable_adapters()
                outs.append(unet_forward(*a, **{**k, "return_dict": False})[0])
            return (torch.stack(outs).mean(0),)

    unet_forward = pipe.unet.forward
    pipe.unet.forward = Mean().forward
    try:
        reference = generate(pipe, steps=2)
    finally:
        del pipe.unet.forward
        pipe.unet.enable_adapters()
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)


def test_the_latent_step_lowers_the_contrastive_loss(loaded):
    pipe, names = loaded
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=1.0, refine_at="0", refine_iters=3, until=0.01) as s:
        generate(pipe, steps=2)
    losses = [loss for _, loss in s.composer.losses]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1e-3


def test_the_scheduler_steps_from_the_updated_latent(loaded):
    pipe, names = loaded
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=20.0, refine_iters=0) as s:
        moved = generate(pipe, steps=2)
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0, refine_iters=0):
        still = generate(pipe, steps=2)
    assert len(s.composer.losses) == 1  # step 0 of 2 (the first half)
    assert not torch.allclose(moved, still, atol=1e-4)


def test_one_lora_or_identical_loras_reduce_to_the_lora_alone():
    pipe = fresh_pipeline()
    make_lora(pipe, "a", seed=3)
    make_lora(pipe, "b", seed=3)  # the same factors under another name
    pipe.unet.set_adapters(["a"])
    alone = generate(pipe, prompt="cross left")
    with compose(pipe, ["a"], "clora", prompt="cross left", words="cross", background=False, refine_iters=2) as one:
        ours = generate(pipe, prompt="cross left")
    torch.testing.assert_close(ours, alone, rtol=0, atol=2e-5)
    with compose(pipe, ["a", "b"], "clora", prompt="cross left", words="cross,cross", background=False,
                 refine_iters=2) as two:
        twins = generate(pipe, prompt="cross left")
    torch.testing.assert_close(twins, alone, rtol=0, atol=2e-5)
    assert all(loss == 0 for _, loss in one.composer.losses + two.composer.losses) and one.composer.losses


def test_refusals(loaded):
    from diffusers import HeunDiscreteScheduler

    pipe, names = loaded
    with pytest.raises(ValueError, match="needs the prompt"):
        with compose(pipe, names, "clora"):
            pass
    with pytest.raises(ValueError, match="concept word 'yellow' is not in the prompt 'cross left'"):
        with compose(pipe, names, "clora", prompt="cross left"):
            pass
    with pytest.raises(ValueError, match="takes no layout"):
        with compose(pipe, names, "clora", prompt=PROMPT, layout=[(0, 0, 16, 16), (16, 16, 32, 32)]):
            pass
    with pytest.raises(ValueError, match="3 concept words for 2 LoRAs"):
        with compose(pipe, names, "clora", prompt=PROMPT, words="a,b,c"):
            pass
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler is a second-order scheduler"):
        with compose(pipe, names, "clora", prompt=PROMPT, refine_iters=0):
            generate(pipe, steps=2)
    with compose(pipe, names, "clora", prompt=PROMPT, step_size=0):  # fusion alone leaves the latent: allowed
        pass
