"""SG-LoRA and ICM-LoRA on the tiny zoo: PEFT-loadable output, similarity weights, reconstruction, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import zoo as models
from lorakit.generate import GENERATORS
from lorakit.generate.features import embed
from lorakit.generate.icm_lora import ICMLoRA
from lorakit.generate.params import ParamSpace, write_adapter
from lorakit.generate.sg_lora import SGLoRA
from lorakit.generate.zooindex import Zoo, ZooError


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return Zoo.open(tiny_zoo)


@pytest.fixture(scope="module")
def sg(zoo):
    return SGLoRA(top_k=3, temperature=0.05).fit(zoo)


@pytest.fixture(scope="module")
def icm(zoo):
    model, tokenizer = models.load("tiny-bert", num_labels=2)
    return ICMLoRA().fit(zoo, model, tokenizer, {e["name"]: e["demos"] for e in zoo.entries("expert")})


def test_registered():
    assert GENERATORS.get("sg_lora") is SGLoRA and GENERATORS.get("icm_lora") is ICMLoRA
    assert lorakit.GENERATORS is GENERATORS


def test_generated_adapter_loads_in_peft_and_matches_lorakit(sg, tmp_path):
    peft = pytest.importorskip("peft")
    state = sg.generate("Is this word the name of an animal or of a food?")
    base = models.load("tiny-bert", num_labels=2)[0]
    path = write_adapter(state, tmp_path / "sg", base)
    batch = {"input_ids": torch.tensor([[1, 120, 97, 116, 2], [1, 100, 111, 103, 2]]),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    ours = lorakit.load_peft(models.load("tiny-bert", num_labels=2)[0], path)
    theirs = peft.PeftModel.from_pretrained(models.load("tiny-bert", num_labels=2)[0], str(path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)
        hidden = [m(**batch, output_hidden_states=True).hidden_states[-1] for m in (base, ours, theirs)]
    torch.testing.assert_close(hidden[2], hidden[1], rtol=1e-5, atol=1e-5)
    assert (hidden[1] - hidden[0]).abs().max() > 1e-2  # the generated adapter changes the model


def test_weights_follow_description_similarity(sg):
    query = "Is this word the name of an animal or of a plant?"  # an expert's own description
    weights = sg.weights(query)
    sims = {n: float(embed([d])[0] @ embed([query])[0]) for n, d in zip(sg.names, sg.descriptions)}
    ranked = sorted(sims, key=sims.get, reverse=True)[:3]
    assert list(weights) == ranked and ranked[0] == "animal-plant"
    expected = torch.softmax(torch.tensor([sims[n] for n in ranked]) / 0.05, 0)
    torch.testing.assert_close(torch.tensor(list(weights.values())), expected, rtol=1e-4, atol=1e-5)
    values = list(weights.values())
    assert values == sorted(values, reverse=True) and values[0] > 1 / 3 + 0.1  # neither uniform nor inverted


def test_generation_moves_toward_the_most_similar_expert(zoo, sg):
    # a description equal to an expert's gives (nearly) that expert's adapter, closer than to any other expert
    space = sg.space
    out = space.flatten(sg.generate(zoo.entry("tool-place")["description"]))
    dist = {n: (out - space.flatten(zoo.state(n))).norm().item() for n in sg.names}
    assert min(dist, key=dist.get) == "tool-place"


def _errors(space, generated, truth):
    return torch.stack([F.mse_loss(space.flatten(g), space.flatten(t)) for g, t in zip(generated, truth)]).mean()


def test_cvae_reconstructs_training_adapters_better_than_the_mean_adapter(zoo, sg, icm):
    # conditioned on each training task, the generators give back that task's adapter with at most half the error
    # of the mean adapter (which every task-blind generator can reach)
    truth = [zoo.state(n) for n in sg.names]
    mean = sg.space.unflatten(torch.stack([sg.space.flatten(s) for s in truth]).mean(0))
    baseline = _errors(sg.space, [mean] * len(truth), truth)
    sg_out = [sg.generate(zoo.entry(n)["description"]) for n in sg.names]
    model, tokenizer = models.load("tiny-bert", num_labels=2)
    icm_out = [icm.generate(icm.task_vector(model, tokenizer, zoo.entry(n)["demos"])) for n in icm.names]
    assert _errors(sg.space, sg_out, truth) < 0.5 * baseline
    assert _errors(sg.space, icm_out, truth) < 0.5 * baseline


def test_sampling_is_seeded_and_differs_from_the_mean(sg):
    description = "Is this word the name of an animal or of a food?"
    a, b = sg.generate(description, sample=True, seed=1), sg.generate(description, sample=True, seed=1)
    mean = sg.generate(description)
    path = a.modules()[0]
    assert torch.equal(a.tensors[path]["lora_B.weight"], b.tensors[path]["lora_B.weight"])
    assert not torch.equal(a.tensors[path]["lora_B.weight"], mean.tensors[path]["lora_B.weight"])


def test_storage_is_reported(icm):
    assert 0 < icm.nbytes() and icm.adapter_bytes > 0


@pytest.mark.parametrize("description", ["", "   "])
def test_empty_description_is_refused(sg, description):
    with pytest.raises(ValueError, match="description is empty"):
        sg.generate(description)


def test_adapters_of_another_layout_are_refused(zoo):
    good = zoo.state("animal-plant")
    path = good.modules()[0]
    bad = lorakit.AdapterState(good.config, {**good.tensors, path: {
        "lora_A.weight": torch.zeros(3, good.tensors[path]["lora_A.weight"].shape[1]),
        "lora_B.weight": torch.zeros(good.tensors[path]["lora_B.weight"].shape[0], 3)}})
    with pytest.raises(ZooError, match="'odd' does not share the layout of 'animal-plant'"):
        ParamSpace.fit([good, bad], ["animal-plant", "odd"])


def test_icm_refuses_a_model_of_another_base(zoo):
    model, tokenizer = models.load("tiny-bert", num_labels=2, seed=3)
    with pytest.raises(ZooError, match=zoo.index["fingerprint"]):
        ICMLoRA().fit(zoo, model, tokenizer, {e["name"]: e["demos"] for e in zoo.entries("expert")})
