"""The batched LoRA operator against the token-by-token reference: mixed ranks, no-adapter tokens, every backend."""

import pytest
import torch

from lorakit.serve import ops


def _adapters(ranks, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + i) for i, r in enumerate(ranks)]


def _tables(adapters, dtype=torch.float32):
    """One class per distinct rank; returns (tables, adapter -> (class index, slot), class keys)."""
    keys = sorted({a.shape[0] for a, _, _ in adapters})
    where, per_class = {}, {k: [] for k in keys}
    for i, (a, b, s) in enumerate(adapters):
        where[i] = (keys.index(a.shape[0]), len(per_class[a.shape[0]]))
        per_class[a.shape[0]].append(ops.pack_low_rank(a, b, s, dtype))
    tables = {k: (torch.stack([p[0] for p in v]), torch.stack([p[1] for p in v])) for k, v in per_class.items()}
    return tables, where, keys


def _case(num_tokens, ranks, d_in=32, d_out=48, none_share=0.2, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    adapters = _adapters(ranks, d_in, d_out, seed)
    tables, where, keys = _tables(adapters)
    choice = torch.randint(0, len(adapters), (num_tokens,), generator=g).tolist()
    choice = [None if torch.rand(1, generator=g).item() < none_share else c for c in choice]
    cls = torch.tensor([-1 if c is None else where[c][0] for c in choice])
    slot = torch.tensor([0 if c is None else where[c][1] for c in choice])
    x = torch.randn(num_tokens, d_in, generator=g)
    expected = ops.reference_delta(x, [None if c is None else adapters[c] for c in choice])
    return x, ops.plan_step(cls, slot, keys), tables, expected


@pytest.mark.parametrize("backend", ["grouped", "segments", "bmm", "auto"])
@pytest.mark.parametrize("num_tokens,ranks", [(7, [8]), (32, [8, 16, 32, 64]), (300, [4, 8, 8, 64, 16]), (1, [64])])
def test_batched_update_matches_reference(backend, num_tokens, ranks):
    if backend == "grouped" and not ops.grouped_mm_available():
        pytest.skip("this torch build has no grouped_mm")
    x, plan, tables, expected = _case(num_tokens, ranks)
    base = torch.randn(num_tokens, expected.shape[1])
    y = ops.lora_add_(base.clone(), x, plan, tables, backend=backend)
    torch.testing.assert_close(y - base, expected, atol=1e-4, rtol=1e-4)


def test_tokens_without_adapter_are_untouched_and_identity_order_needs_no_gather():
    x, plan, tables, expected = _case(20, [8, 16], none_share=0.5)
    y = ops.lora_add_(torch.zeros_like(expected), x, plan, tables)
    untouched = (expected == 0).all(dim=1)
    assert untouched.any() and (y[untouched] == 0).all()
    # one class, tokens already in slot order: the plan keeps no index
    cls, slot = torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 1, 2])
    assert ops.plan_step(cls, slot, ["k"]).classes[0].index is None


def test_mixed_ranks_are_not_padded_to_the_largest():
    _, _, tables, _ = _case(10, [8, 64])
    assert {k: t[0].shape[-1] for k, t in tables.items()} == {8: 8, 64: 64}
    assert ops.padded_rank(3, torch.float32) == 4 and ops.padded_rank(3, torch.bfloat16) == 8


def test_half_precision_activations_with_fp32_tables():
    x, plan, tables, expected = _case(16, [8, 16])
    y = ops.lora_add_(torch.zeros(16, expected.shape[1], dtype=torch.bfloat16), x.bfloat16(), plan, tables)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_unaligned_shapes_fall_back_to_segments():
    x, plan, tables, expected = _case(9, [8], d_in=5, d_out=7)  # rows of 5 and 7 floats: not 16-byte aligned
    y = ops.lora_add_(torch.zeros_like(expected), x, plan, tables)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    if ops.grouped_mm_available():
        with pytest.raises(ValueError, match="cannot run these shapes"):
            ops.lora_add_(torch.zeros_like(expected), x, plan, tables, backend="grouped")


def test_classes_absent_from_a_module_are_skipped():
    x, plan, tables, expected = _case(12, [8, 16], none_share=0.0)
    only8 = {8: tables[8]}
    y = ops.lora_add_(torch.zeros_like(expected), x, plan, only8)
    rank8_rows = plan.classes[0].index if plan.classes[0].key == 8 else plan.classes[1].index
    mask = torch.zeros(12, dtype=torch.bool)
    mask[rank8_rows] = True
    torch.testing.assert_close(y[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (y[~mask] == 0).all()


def test_bmm_blocks_pad_uneven_and_empty_slots():
    adapters = _adapters([8, 8, 8, 8], 16, 24)
    tables, where, keys = _tables(adapters)
    choice = [3, 0, 0, None, 3, 0, 3, 3]  # slots 1 and 2 hold no token, slot 3 four, slot 0 three
    cls = torch.tensor([-1 if c is None else 0 for c in choice])
    slot = torch.tensor([0 if c is None else where[c][1] for c in choice])
    x = torch.randn(len(choice), 16)
    plan = ops.plan_step(cls, slot, keys)
    assert plan.classes[0].width == 4 and plan.classes[0].pick is not None
    expected = ops.reference_delta(x, [None if c is None else adapters[c] for c in choice])
    y = ops.lora_add_(torch.zeros_like(expected), x, plan, tables, backend="bmm")
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
