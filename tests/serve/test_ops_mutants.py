"""The batched LoRA operator's plan, backend choice and edge cases, pinned where mutation testing found them loose."""

import pytest
import torch

from lorakit.serve import ops

from test_batched_lora import _adapters, _tables


def _run(choice, adapters, backend, d_in, x_dtype=torch.float32):
    """y from ``lora_add_`` and from the reference for tokens choosing ``choice`` (adapter index or None)."""
    tables, where, keys = _tables(adapters)
    cls = torch.tensor([-1 if c is None else where[c][0] for c in choice])
    slot = torch.tensor([0 if c is None else where[c][1] for c in choice])
    x = torch.randn(len(choice), d_in, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    expected = ops.reference_delta(x.float(), [None if c is None else adapters[c] for c in choice])
    plan = ops.plan_step(cls, slot, keys)
    y = ops.lora_add_(torch.zeros(len(choice), expected.shape[1], dtype=x_dtype), x, plan, tables, backend=backend)
    return y.float(), expected, plan


def test_plan_golden():
    """A hand-worked plan: an empty first class, a padded class starting at slot 2, an unpadded one at slot 1."""
    token_class = torch.tensor([1, 2, 1, -1, 1, 1, 2, 2, 2])
    token_slot = torch.tensor([3, 1, 2, 0, 3, 5, 2, 1, 2])
    plan = ops.plan_step(token_class, token_slot, ["empty", "a", "b"])
    assert plan.num_tokens == 9 and [cp.key for cp in plan.classes] == ["a", "b"]
    a, b = plan.classes
    # class a: tokens 0, 2, 4, 5 at slots 3, 2, 3, 5 -> slot order 2, 3, 3, 5 (stable), slots 2..5
    assert a.index.tolist() == [2, 0, 4, 5] and (a.lo, a.hi, a.width) == (2, 6, 2)
    assert a.counts == [1, 2, 0, 1] and a.offs.tolist() == [1, 3, 3, 4] and a.offs.dtype == torch.int32
    assert a.pick.tolist() == [0, 2, 3, 6]  # block row of each token: slot * width + position in slot
    assert a.src[a.pick].tolist() == a.index.tolist() and set(a.src.tolist()) <= {2, 0, 4, 5}
    # class b: tokens 1, 7 at slot 1 and 6, 8 at slot 2: two full rows of width 2, no padding
    assert b.index.tolist() == [1, 7, 6, 8] and (b.lo, b.hi, b.width) == (1, 3, 2)
    assert b.counts == [2, 2] and b.pick is None and b.src.tolist() == [1, 7, 6, 8]


def test_identity_plan_gathers_nothing():
    plan = ops.plan_step(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), ["k"])
    cp = plan.classes[0]
    assert cp.index is None and cp.src is None and cp.pick is None


def test_bmm_suits_thresholds():
    def cp(lo, hi, width, tokens):
        return ops.ClassPlan("k", None, torch.tensor([tokens], dtype=torch.int32), [], lo, hi, width, None, None)

    assert ops.bmm_suits(cp(1, 3, 200, 200))  # 400 padded rows for 200 tokens: exactly double
    assert not ops.bmm_suits(cp(1, 3, 201, 200))  # 402 > 400
    assert ops.bmm_suits(cp(0, 1, 256, 1))  # under 256 rows: always
    assert not ops.bmm_suits(cp(0, 1, 257, 1))
    assert not ops.bmm_suits(cp(5, 7, 151, 150)) and ops.bmm_suits(cp(5, 7, 150, 150))


def test_padded_rank_is_the_least_16_byte_multiple():
    for dtype in (torch.int8, torch.bfloat16, torch.float32, torch.float64, torch.complex128):
        size = torch.empty(0, dtype=dtype).element_size()
        for r in range(1, 20):
            want = next(p for p in range(r, r + 17) if p * size % 16 == 0)
            assert ops.padded_rank(r, dtype) == want, (dtype, r)


def test_pack_low_rank_in_bf16():
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    at, bt = ops.pack_low_rank(a, b, 0.5, torch.bfloat16)
    assert at.dtype == bt.dtype == torch.bfloat16 and at.shape == (5, 8) and bt.shape == (8, 7)
    assert (at[:, 3:] == 0).all() and (bt[3:] == 0).all()
    torch.testing.assert_close(bt[:3].float(), (b * 0.5).T.bfloat16().float())


def test_grouped_mm_available_reports_the_build():
    present = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    assert ops.grouped_mm_available() is (present is not None)


@pytest.mark.parametrize("backend", ["segments", "bmm", "auto", "grouped"])
def test_many_slots_in_a_class_starting_above_slot_zero(backend):
    """Five adapters of one rank; slot 0 unused by the step, three and more slots in use."""
    if backend == "grouped" and not ops.grouped_mm_available():
        pytest.skip("this torch build has no grouped_mm")
    adapters = _adapters([8] * 5, 16, 24)
    y, expected, plan = _run([1, 2, 3, 4, 4, 2, 1, 3, None, 3], adapters, backend, 16)
    assert plan.classes[0].lo == 1
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_a_class_missing_from_the_tables_does_not_stop_later_classes():
    adapters = _adapters([4, 8], 16, 24)
    tables, where, keys = _tables(adapters)
    x = torch.randn(4, 16)
    plan = ops.plan_step(torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long), keys)
    y = ops.lora_add_(torch.zeros(4, 24), x, plan, {8: tables[8]})  # the rank-4 class comes first, absent
    expected = ops.reference_delta(x, [None, adapters[1], None, adapters[1]])
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def _forbid(monkeypatch, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not run here")

    monkeypatch.setattr(ops, name, fail)


def test_auto_uses_bmm_for_decode_steps(monkeypatch):
    _forbid(monkeypatch, "_GROUPED_MM")
    _forbid(monkeypatch, "_segments")
    y, expected, _ = _run([0, 1, 2, 1], _adapters([8, 8, 8], 16, 24), "auto", 16)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def _prefill(n=300):
    """One slot with many tokens and two with a single token: bmm padding would triple the rows."""
    return [0] * n + [1, 2], _adapters([8, 8, 8], 16, 24)


def test_auto_uses_grouped_mm_for_prefill_when_available(monkeypatch):
    if not ops.grouped_mm_available():
        pytest.skip("this torch build has no grouped_mm")
    _forbid(monkeypatch, "_segments")
    choice, adapters = _prefill()
    y, expected, plan = _run(choice, adapters, "auto", 16)
    assert not ops.bmm_suits(plan.classes[0])
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
def test_segments_backend_never_calls_grouped_mm(monkeypatch, grouped):
    _forbid(monkeypatch, "_GROUPED_MM")
    choice, adapters = _prefill(40)
    y, expected, _ = _run(choice, adapters, "segments", 16)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_auto_without_grouped_mm_uses_segments(monkeypatch):
    monkeypatch.setattr(ops, "_GROUPED_MM", None)
    choice, adapters = _prefill()
    y, expected, _ = _run(choice, adapters, "auto", 16)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d_in,d_out", [(5, 8), (8, 5)])
def test_any_unaligned_operand_falls_back(d_in, d_out):
    choice, _ = _prefill(40)
    adapters = _adapters([8, 8, 8], d_in, d_out)
    y, expected, _ = _run(choice, adapters, "auto", d_in)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["segments", "auto"])
def test_bf16_activations_on_gathered_backends(backend):
    choice, adapters = _prefill(40)
    y, expected, _ = _run(choice, adapters, backend, 16, x_dtype=torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=0.1, rtol=0.05)


def test_reference_delta_edge_cases():
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert ops.reference_delta(x, [None, None]).shape == (2, 0)
    assert ops.reference_delta(x[:0], []).shape == (0, 0)
    a, b = torch.randn(3, 4), torch.randn(5, 3)
    got = ops.reference_delta(x, [(a, b, 2.0), None])
    assert got.dtype == torch.bfloat16 and (got[1] == 0).all()
    torch.testing.assert_close(got[0], (b.bfloat16() @ (a.bfloat16() @ x[0])) * 2.0)


@pytest.mark.parametrize("d_in,d_out", [(5, 8), (8, 5)])
def test_grouped_refuses_any_unaligned_operand(d_in, d_out):
    if not ops.grouped_mm_available():
        pytest.skip("this torch build has no grouped_mm")
    choice, _ = _prefill(40)
    with pytest.raises(ValueError, match="cannot run these shapes"):
        _run(choice, _adapters([8, 8, 8], d_in, d_out), "grouped", d_in)
