"""Proposers of synthetic task inputs from a few seed examples (Trans-LoRA's step 1).

- `LMGenerator`: the paper's route. A causal LM (any `lorakit.zoo` name or local directory, e.g. `gemma-270m`
  with the gemma extra) continues a few-shot prompt that lists the seeds, one sampled line per input.
- `NGramGenerator`: the fallback where no usable generator LM loads offline. A word trigram model with
  interpolated backoff, fitted on the seeds (each counted `seed_weight` times) plus optional *background* text,
  samples sentences. With no background it only recombines the seeds' words; background text (e.g. other
  bundled corpora, not the task's data) stands in for the general language knowledge of the paper's LLM.
  Copies of a seed and repeated proposals are dropped.
Every proposer reports what it is (`describe()`), and the transfer records that string with the result.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

BOS, EOS = "<s>", "</s>"
WORD = re.compile(r"[A-Za-z0-9@#'_-]+|[^\sA-Za-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of `text`."""
    return WORD.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Tokens joined by spaces, with no space before closing punctuation."""
    return re.sub(r" ([.,!?;:)\]])", r"\1", " ".join(tokens))


class NGramGenerator:
    """Word trigram sampler fitted on the seeds plus background text (the documented fallback generator)."""

    def __init__(self, background: Sequence[str] = (), seed_weight: int = 20, weights=(0.6, 0.3, 0.1),
                 max_words: int = 40, name: str = ""):
        self.background, self.seed_weight, self.weights = list(background), seed_weight, weights
        self.max_words, self.name = max_words, name

    def describe(self) -> str:
        """What proposes the inputs, for the record of a transfer."""
        source = f"+ {len(self.background)} background texts ({self.name})" if self.background else "only"
        return f"ngram: word trigram over the seeds {source}"

    def _fit(self, seeds: Sequence[str]):
        grams = [Counter(), defaultdict(Counter), defaultdict(Counter)]
        for texts, weight in ((seeds, self.seed_weight), (self.background, 1)):
            for text in texts:
                toks = [BOS, BOS, *words(text), EOS]
                for i in range(2, len(toks)):
                    grams[0][toks[i]] += weight
                    grams[1][toks[i - 1]][toks[i]] += weight
                    grams[2][(toks[i - 2], toks[i - 1])][toks[i]] += weight
        return grams

    def _sample(self, grams, rng: random.Random) -> list[str]:
        out, context = [], (BOS, BOS)
        while len(out) < self.max_words:
            tables = [grams[0], grams[1].get(context[1]), grams[2].get(context)]
            levels = [(w, t) for w, t in zip(self.weights[::-1], tables) if t]
            table = rng.choices([t for _, t in levels], weights=[w for w, _ in levels])[0]
            token = rng.choices(list(table), weights=list(table.values()))[0]
            if token == EOS:
                if out:
                    break
                continue
            out.append(token)
            context = (context[1], token)
        return out

    def propose(self, seeds: Sequence[str], n: int, seed: int = 0) -> list[str]:
        """Up to `n` distinct sampled inputs, none a copy of a seed."""
        grams, rng = self._fit(seeds), random.Random(seed)
        known, out = {detokenize(words(s)) for s in seeds}, []
        for _ in range(20 * n):
            text = detokenize(self._sample(grams, rng))
            if text and text not in known:
                known.add(text)
                out.append(text)
                if len(out) == n:
                    break
        return out


class LMGenerator:
    """A causal LM continuing a few-shot prompt of the seeds (the paper's generator)."""

    def __init__(self, model, tokenizer, header: str = "Examples of the same kind of text, one per line:",
                 shots: int = 5, max_new_tokens: int = 40, temperature: float = 1.0, top_p: float = 0.95,
                 batch_size: int = 16, name: str = ""):
        self.model, self.tokenizer, self.header, self.shots = model.eval(), tokenizer, header, shots
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = max_new_tokens, temperature, top_p, batch_size
        self.name = name or getattr(model.config, "_name_or_path", type(model).__name__)

    def describe(self) -> str:
        """What proposes the inputs, for the record of a transfer."""
        return f"lm: {self.name} continuing a {self.shots}-shot prompt (temperature {self.temperature}, top-p {self.top_p})"

    def _prompt(self, seeds: Sequence[str], rng: random.Random) -> str:
        shown = rng.sample(list(seeds), min(self.shots, len(seeds)))
        lines = "".join(f"- {' '.join(s.split())}\n" for s in shown)
        return f"{self.header}\n{lines}- "

    @torch.no_grad()
    def propose(self, seeds: Sequence[str], n: int, seed: int = 0) -> list[str]:
        """Up to `n` distinct generated lines, none a copy of a seed."""
        rng, tok = random.Random(seed), self.tokenizer
        known, out = {" ".join(s.split()) for s in seeds}, []
        side, tok.padding_side = getattr(tok, "padding_side", "right"), "left"
        torch.manual_seed(seed)
        try:
            for _ in range(max(1, 4 * n // self.batch_size)):
                enc = tok([self._prompt(seeds, rng) for _ in range(self.batch_size)], return_tensors="pt", padding=True)
                gen = self.model.generate(**enc, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                          max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id)
                for row in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True):
                    text = " ".join(row.split("\n")[0].split())
                    if text and text not in known:
                        known.add(text)
                        out.append(text)
                if len(out) >= n:
                    break
        finally:
            tok.padding_side = side
        return out[:n]
