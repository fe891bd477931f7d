"""The ONNX BERT reader: paraphrase-MiniLM-L3-v2 converted from its packaged ONNX file computes what the file does."""
from __future__ import annotations

import pytest

from lorakit import zoo


def test_the_converted_encoder_matches_onnx_reference_evaluation():
    pytest.importorskip("onnx")
    from importlib import metadata

    from lorakit.formats.onnx_bert import check_against_onnx

    try:
        files = metadata.distribution(zoo.L3_DIST).files or []
    except metadata.PackageNotFoundError:
        pytest.skip(f"needs {zoo.L3_DIST}")
    onnx_file = next(f.locate() for f in files if f.name == zoo.L3_FILE)
    assert check_against_onnx(onnx_file, zoo.paraphrase_l3_dir(), "the crew was kind, the flight was late") < 1e-4


def test_paraphrase_minilm_l3_loads_as_a_classifier_with_an_identity_pooler():
    pytest.importorskip("onnx")
    import torch

    try:
        model, tok = zoo.load("paraphrase-minilm-l3", num_labels=4)
    except ImportError as e:
        pytest.skip(str(e))
    assert model.config.num_hidden_layers == 3 and model.config.num_labels == 4
    torch.testing.assert_close(model.bert.pooler.dense.weight, torch.eye(384))
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
