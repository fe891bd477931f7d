"""Merged adapters load in PEFT, and match PEFT's ``add_weighted_adapter`` where the definitions agree."""
from __future__ import annotations

import pytest
import torch
from merge_helpers import assert_close

import lorakit
from lorakit import zoo
from lorakit.merging import MERGERS, combine
from lorakit.merging.task_vectors import combine_task_vectors
from lorakit.testing import perturb_

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 14, 2, 7, 3, 11]])
CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=["v_proj", "o_proj"], use_rslora=True),
    "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2}),
    "d": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def base():
    model, _ = zoo.load("tiny-llama", task="causal_lm")
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Saved LoRA adapters on tiny-llama: name -> (state, directory)."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1):
        model = lorakit.apply(base(), lorakit.LoRAConfig(**cfg))
        perturb_(model, 0.05, seed)
        state = lorakit.AdapterState.from_model(model)
        out[name] = (state, lorakit.save_state(state, tmp_path_factory.mktemp(name)))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def peft_with(adapters, names):
    model = PeftModel.from_pretrained(base(), str(adapters[names[0]][1]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n][1]), adapter_name=n)
    return model


def peft_delta(model, path, name="m"):
    return model.base_model.model.get_submodule(path).get_delta_weight(name)


@pytest.mark.parametrize("method", MERGERS.names())
def test_peft_loads_every_merge(method, adapters, tmp_path):
    states = [adapters[n][0] for n in "abc"]
    merged = combine(states, method, [0.5, 0.3, 0.2])
    directory = lorakit.save_state(merged, tmp_path / "merged")
    ours = logits(lorakit.load_peft(base(), directory))
    theirs = logits(PeftModel.from_pretrained(base(), str(directory)))
    assert_close(theirs, ours, f"{method}: PEFT vs lorakit logits")
    folded = base()
    with torch.no_grad():
        for path in merged.modules():
            folded.get_submodule(path).weight += merged.delta(path)
    assert_close(logits(folded), ours, f"{method}: adapter vs folded update", atol=1e-4)
    assert not torch.allclose(ours, logits(base()), atol=1e-4), f"{method}: the merge changed nothing"


def test_cat_matches_peft_cat(adapters):
    weights = [0.6, -0.4]
    model = peft_with(adapters, ["a", "b"])
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="cat")
    ours = combine([adapters["a"][0], adapters["b"][0]], "cat", weights)
    for path in ours.modules():
        assert_close(peft_delta(model, path), ours.delta(path), f"cat {path}")
        if path.endswith("v_proj"):  # in both adapters: PEFT pads nothing, so the tensors are identical
            layer = model.base_model.model.get_submodule(path)
            assert torch.equal(layer.lora_A["m"].weight, ours.tensors[path]["lora_A.weight"])
            assert torch.equal(layer.lora_B["m"].weight, ours.tensors[path]["lora_B.weight"])


def test_svd_matches_peft_svd(adapters):
    weights = [0.6, -0.4, 1.1]
    model = peft_with(adapters, ["a", "b", "c"])
    model.add_weighted_adapter(["a", "b", "c"], weights, "m", combination_type="svd", svd_rank=3)
    ours = combine([adapters[n][0] for n in "abc"], "svd", weights, rank=3)
    for path in ours.modules():
        assert_close(peft_delta(model, path), ours.delta(path), f"svd {path}", atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_dense_task_vector_merges_match_peft_svd_variants(method, adapters):
    """Equal positive weights, where electing on weighted and unweighted task vectors agree.

    Rank 32: PEFT's ``*_svd`` breaks for ranks above min(out, in) (32 for v_proj here).
    """
    weights = [0.7, 0.7, 0.7]
    model = peft_with(adapters, ["a", "b", "c"])
    model.add_weighted_adapter(["a", "b", "c"], weights, "m", combination_type=f"{method}_svd", density=0.3, svd_rank=32)
    ours = combine([adapters[n][0] for n in "abc"], method, weights, density=0.3, rank=32)
    for path in ours.modules():
        assert_close(peft_delta(model, path), ours.delta(path), f"{method} {path}", atol=1e-5)


@pytest.mark.parametrize("variant", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_merge_utils_for_the_same_seed(variant):
    """Same masks from the same seed; equal weights for dare_ties, where PEFT's unweighted election agrees."""
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(24, 16, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, 0.25] if variant == "dare_linear" else [0.5, 0.5, 0.5]
    extra = () if variant == "dare_linear" else ("total",)
    torch.manual_seed(11)
    theirs = getattr(merge_utils, variant)(taus, torch.tensor(weights), 0.4, *extra)
    ours = combine_task_vectors(torch.stack(taus), weights, variant, density=0.4, generator=torch.Generator().manual_seed(11))
    assert_close(ours, theirs, variant, atol=1e-6)


def test_peft_linear_is_not_the_weighted_sum_and_ours_is(adapters):
    """The intentional difference: PEFT's ``linear`` mixes A and B separately, so B A has cross terms."""
    model = peft_with(adapters, ["a", "d"])  # equal ranks, as PEFT's linear requires
    model.add_weighted_adapter(["a", "d"], [0.5, 0.5], "m", combination_type="linear")
    ours = combine([adapters["a"][0], adapters["d"][0]], "linear", [0.5, 0.5])
    path = "model.layers.1.self_attn.v_proj"
    average = 0.5 * adapters["a"][0].delta(path) + 0.5 * adapters["d"][0].delta(path)
    assert_close(ours.delta(path), average)
    assert (peft_delta(model, path) - average).abs().max() > 0.1 * average.abs().max()


def test_cli_merges_directories_written_by_peft_and_lorakit(adapters, tmp_path, capsys):
    """`lorakit merge` on two adapters that peft itself saved and one lorakit saved; PEFT loads the result."""
    from peft import LoraConfig, get_peft_model

    from lorakit.merging import cli_main

    dirs = []
    for seed, cfg in enumerate([dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                dict(r=2, lora_alpha=4, target_modules=["v_proj"], use_rslora=True)]):
        torch.manual_seed(10 + seed)
        made = get_peft_model(base(), LoraConfig(init_lora_weights=False, **cfg))  # B random: a non-zero update
        made.save_pretrained(tmp_path / f"peft{seed}")
        dirs.append(str(tmp_path / f"peft{seed}"))
    dirs.append(str(adapters["a"][1]))
    out = tmp_path / "merged"
    assert cli_main([*dirs, "--method", "cat", "--weights", "0.5", "0.3", "0.2", "-o", str(out)]) == 0
    assert "merged 3 adapters with cat" in capsys.readouterr().out

    states = [lorakit.load_state(d) for d in dirs]
    merged = PeftModel.from_pretrained(base(), str(out), adapter_name="m")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        expected = sum(w * s.delta(path) for w, s in zip((0.5, 0.3, 0.2), states) if path in s.tensors)
        assert expected.abs().max() > 0
        assert_close(peft_delta(merged, path), expected, path)
