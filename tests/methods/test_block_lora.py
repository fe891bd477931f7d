"""Block-LoRA claim tests: one shared down-projection head, fewer parameters, additions in place of A's products."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.block_lora import BlockLoRAConfig
from lorakit.testing import check_method, perturb_
from peft_parity import MLP, X

TARGETS = ["up", "down"]


def test_conformance():
    assert len(check_method("block_lora")) == 26


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_parameter_count_falls_with_the_number_of_blocks(k):
    model = lorakit.apply(MLP(), BlockLoRAConfig(r=4, block_num=k, target_modules=TARGETS))
    count = sum(p.numel() for p in lorakit.trainable_parameters(model).values())
    lora = 4 * (32 + 48) + 4 * (48 + 32)
    assert count == (4 * 48 + 4 * 32 // k) + (4 * 32 + 4 * 48 // k)
    assert (count == lora) == (k == 1)


def test_update_is_b_times_the_tiled_shared_head():
    model = lorakit.apply(MLP(), BlockLoRAConfig(r=4, block_num=4, target_modules=["up"]))
    perturb_(model, scale=0.5)
    delta = lorakit.AdapterState.from_model(model).delta("up")
    blocks = delta.split(32 // 4, dim=1)
    assert all(torch.equal(b, blocks[0]) for b in blocks)  # every input chunk sees the same head
    assert torch.linalg.matrix_rank(delta).item() <= 4


def test_chunk_sum_forward_equals_lora_with_the_tiled_head():
    model = lorakit.apply(MLP(), BlockLoRAConfig(r=4, lora_alpha=8, block_num=8, target_modules=TARGETS))
    perturb_(model, scale=0.5)
    state = lorakit.AdapterState.from_model(model)
    lora = lorakit.apply(MLP(), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for path in TARGETS:
        a, b, scale = state.low_rank(path)
        assert scale == lora.up.scaling
        getattr(lora, path).load_adapter_tensors({"lora_A.weight": a, "lora_B.weight": b})
    with torch.no_grad():
        torch.testing.assert_close(model(X), lora(X), atol=1e-5, rtol=1e-5)


def test_one_block_is_plain_lora():
    torch.manual_seed(3)
    block = lorakit.apply(MLP(), BlockLoRAConfig(r=4, block_num=1, target_modules=TARGETS))
    torch.manual_seed(3)
    lora = lorakit.apply(MLP(), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for m in (block, lora):
        perturb_(m, scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(block(X), lora(X))


def test_indivisible_width_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="block_num"):
        lorakit.apply(nn.Sequential(nn.Linear(30, 8)), BlockLoRAConfig(block_num=8, target_modules=["0"]))
