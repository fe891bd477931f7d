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


# -- the checks themselves can fail ----------------------------------------------------------------------------
def _adapter_dir(path, tensors: dict, config: dict):
    import json

    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_files_check_sees_keys_values_and_config_fields(tmp_path):
    import torch

    from peft_matrix import files_finding

    a = {"base_model.model.q.lora_A.weight": torch.ones(2, 3), "base_model.model.q.lora_B.weight": torch.zeros(3, 2)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"], "peft_version": "x"}
    ours = _adapter_dir(tmp_path / "ours", a, config)
    same = _adapter_dir(tmp_path / "same", a, {**config, "target_modules": ["v", "q"], "peft_version": "y"})
    assert files_finding(ours, same) == ""  # list order and version stamps carry no meaning
    nudged = _adapter_dir(tmp_path / "nudged", {**a, "base_model.model.q.lora_A.weight": torch.ones(2, 3) * 1.001}, config)
    assert "lora_A.weight: max abs difference" in files_finding(ours, nudged)
    renamed = _adapter_dir(tmp_path / "renamed", {"base_model.model.q.lora_A.default.weight": torch.ones(2, 3),
                                                  "base_model.model.q.lora_B.weight": torch.zeros(3, 2)}, config)
    assert "tensor keys differ" in files_finding(ours, renamed)
    alpha = _adapter_dir(tmp_path / "alpha", a, {**config, "lora_alpha": 8})
    assert "adapter_config.json lora_alpha: lorakit 4, peft 8" in files_finding(ours, alpha)


def test_refusal_check_wants_the_type_and_the_message():
    from peft_matrix import refusal_problem

    good = TypeError("module 'model.embed_tokens' is a Embedding; method 'dora' adapts Linear, Conv1D. Narrow "
                     "target_modules or exclude_modules.")
    assert refusal_problem(good, "dora", "Embedding") == ""
    assert "accepted" in refusal_problem(None, "dora", "Embedding")
    assert "expected TypeError" in refusal_problem(ValueError(str(good)), "dora", "Embedding")
    assert "expected TypeError" in refusal_problem(TypeError("unsupported"), "dora", "Embedding")
    assert "expected ValueError" in refusal_problem(good, "pissa", "Conv2d")  # initialisers refuse by their own error
