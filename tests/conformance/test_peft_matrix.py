"""PEFT conformance matrix (see ``peft_matrix.py``): every cell matches peft 0.21.2 to fp32 tolerance, or
lorakit refuses with a clear error, or (where peft lacks the adapter) peft refuses; none differs silently.

One scenario per method and per architecture runs in ``make test``; the rest is marked slow. The table in
``docs/conformance.md`` is written from these cells by ``bench/conformance_report.py``.
"""
from __future__ import annotations

import pytest

from peft_matrix import DEFECTS, cells, verdict


def _param(cell):
    marks = [] if cell.fast else [pytest.mark.slow]
    if cell.defect:
        reason = "; ".join(f"{d}: {DEFECTS[d]}" for d in cell.defect.split(" + "))
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in cells()])
def test_peft_matrix(cell):
    problem = verdict(cell)
    assert not problem, f"{cell.id} (expected: {cell.expected}): {problem}"
