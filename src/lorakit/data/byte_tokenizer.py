"""A byte-level tokenizer built offline, for the tiny test models in `lorakit.zoo`.

Every UTF-8 byte is one token, so any text round-trips and nothing has to be trained or downloaded.
Ids 0-3 are `<pad> <bos> <eos> <unk>`, ids 4-259 the 256 bytes; encodings start with `<bos>`.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def byte_tokenizer(model_max_length: int = 2048):
    """A `PreTrainedTokenizerFast` with one token per byte (260 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps each byte to a printable character; with no merges BPE keeps them one token each.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <eos> $B", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )
