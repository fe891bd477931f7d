"""LoRAM: pruned training copy, recovery for the full base (zeros at pruned positions), PEFT loads it, fingerprints."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit.compress.loram import LoRAMConfig, align, load_recovered, prune_for_training, save_recovered
from lorakit.train import evaluate, fit

from compress_helpers import lm_data, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_small(config=LoRAMConfig(), steps=15):
    full = tiny_llama()
    small, recovery = prune_for_training(full, config)
    lorakit.apply(small, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL))
    fit(small, lm_data(), lr=1e-2, batch_size=8, max_steps=steps, progress=False, warmup_ratio=0.0)
    return full, small, recovery


def test_the_pruned_copy_is_smaller_and_the_full_base_untouched():
    full = tiny_llama()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small, recovery = prune_for_training(full, LoRAMConfig(ratio=0.5))
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    assert small.config.intermediate_size == 64 and small.config.num_key_value_heads == 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    assert recovery.modules["model.layers.0.mlp.down_proj"]["axis"] == "cols"
    assert recovery.modules["model.layers.0.mlp.down_proj"]["full"] == 128


def test_inplace_pruning_slices_the_given_model_into_the_same_pruned_weights():
    copied, recovery = prune_for_training(tiny_llama(), LoRAMConfig(ratio=0.5))
    full = tiny_llama()
    small, same = prune_for_training(full, LoRAMConfig(ratio=0.5), inplace=True)
    assert small is full and full.config.intermediate_size == 64  # no second model: the given one is pruned
    assert same == recovery
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in small.state_dict().items())


def test_recovered_update_is_zero_on_pruned_coordinates_and_peft_loads_it_on_the_full_base(tmp_path):
    peft = pytest.importorskip("peft")
    full, small, recovery = _train_small()
    out = save_recovered(small, recovery, tmp_path / "loram")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ours = load_recovered(copy.deepcopy(full), out)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(full), out)
    ids = torch.stack([d["input_ids"] for d in lm_data(4, seed=3)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(ids).logits, full(ids).logits, atol=1e-4)
    for path, entry in recovery.modules.items():
        delta = lorakit.adapters(ours)[path].delta_weight()
        pruned = sorted(set(range(entry["full"])) - set(entry["kept"]))
        assert pruned and (delta[pruned] if entry["axis"] == "rows" else delta[:, pruned]).abs().max() == 0
        small_delta = lorakit.adapters(small)[path].delta_weight()
        kept = torch.tensor(entry["kept"])
        torch.testing.assert_close(delta[kept] if entry["axis"] == "rows" else delta[:, kept], small_delta)


def test_recovered_adapter_beats_the_untuned_full_model():
    """The card's CPU check: eval loss of the full model with the recovered adapter beats the full model alone."""
    full, small, recovery = _train_small(steps=30)
    from lorakit.compress.loram import recover
    from lorakit.core.state import AdapterState

    state = recover(AdapterState.from_model(small), recovery)
    tuned = copy.deepcopy(full)
    state.load_into(tuned)
    data = lm_data(16, seed=9)
    assert evaluate(tuned, data, batch_size=8)["loss"] < evaluate(full, data, batch_size=8)["loss"] - 0.1


def test_a_loram_adapter_on_the_wrong_base_names_both_fingerprints(tmp_path):
    full, small, recovery = _train_small(steps=2)
    out = save_recovered(small, recovery, tmp_path / "loram")
    with pytest.raises(ValueError, match=rf"fingerprint {recovery.full_fingerprint}.*another model"):
        load_recovered(tiny_llama(seed=1), out)
    plain_small, _ = prune_for_training(full, LoRAMConfig())
    with pytest.raises(ValueError, match="the pruned training copy"):
        load_recovered(plain_small, out)
    assert not lorakit.adapters(plain_small)  # nothing applied half-way


def test_any_lorakit_loader_refuses_a_recovered_adapter_on_another_base_naming_the_fingerprint(tmp_path):
    from lorakit.core.adapter import AdapterShapeError
    from lorakit.formats.peft import AdapterFileError

    full, small, recovery = _train_small(steps=2)
    out = save_recovered(small, recovery, tmp_path / "loram")
    expected = json.loads((out / "lorakit_base.json").read_text())["fingerprint"]
    other = tiny_llama(seed=1)
    with pytest.raises(AdapterFileError, match=rf"fingerprint {expected}"):
        lorakit.load_peft(other, out)  # the plain loader (serve, merge, eval use it), not only load_recovered
    assert not lorakit.adapters(other)
    pruned = prune_for_training(full, LoRAMConfig())[0]
    with pytest.raises(AdapterShapeError, match="down_proj.*another base model"):  # shapes are checked first
        lorakit.load_peft(pruned, out)
    assert lorakit.adapters(lorakit.load_peft(copy.deepcopy(full), out))  # its own full base loads it


def test_qloram_trains_on_a_4bit_pruned_copy(tmp_path):
    pytest.importorskip("bitsandbytes")
    full, small, recovery = _train_small(LoRAMConfig(ratio=0.25, quantize="nf4"), steps=3)
    assert small.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.uint8
    model = load_recovered(copy.deepcopy(full), save_recovered(small, recovery, tmp_path / "q"))
    assert lorakit.adapters(model)["model.layers.0.mlp.up_proj"].lora_B.weight.shape == (128, 4)


def test_alignment_trains_the_pruned_weights_and_freezes_them_again():
    small, _ = prune_for_training(tiny_llama(), LoRAMConfig(criterion="random"))
    before = small.model.layers[0].mlp.up_proj.weight.clone()
    align(small, lm_data(), lr=1e-3, batch_size=8, max_steps=2, progress=False)
    assert not torch.equal(before, small.model.layers[0].mlp.up_proj.weight)
    assert not any(p.requires_grad for p in small.parameters())


def test_alignment_to_the_full_base_brings_the_pruned_hidden_states_closer_and_leaves_embeddings_alone():
    full = tiny_llama()
    small, _ = prune_for_training(full, LoRAMConfig(ratio=0.5))
    embed = small.model.embed_tokens.weight.clone()
    ids = torch.stack([d["input_ids"] for d in lm_data(8, seed=4)])

    def gap():
        with torch.no_grad():
            return (small.model(ids).last_hidden_state - full.model(ids).last_hidden_state).pow(2).mean().item()

    before = gap()
    align(small, lm_data(), teacher=full, lr=1e-3, batch_size=8, max_steps=20, progress=False, warmup_ratio=0.0)
    assert gap() < 0.7 * before
    assert torch.equal(embed, small.model.embed_tokens.weight) and not any(p.requires_grad for p in small.parameters())


def test_bases_with_weights_over_2_to_the_24_elements_are_recorded():
    """LoRAM records the full base when pruning; float32 sample positions once overshot such a weight's end."""
    from lorakit.core.fingerprint import _sample

    big = torch.arange(2**25 + 1, dtype=torch.float32)  # numel - 1 = 2**25 is exact; numel is not representable
    assert _sample(big)[-1] == float(2**25) and _sample(torch.zeros(32768000))[-1] == 0.0  # the Llama embedding


@pytest.mark.parametrize("bad", [0, 1, 2.0])
def test_ratio_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        LoRAMConfig(ratio=bad)
