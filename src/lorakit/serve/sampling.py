"""Per-request decoding: greedy or sampled next tokens, and text streamed without crossing a stop string.

``logit_bias`` is added to the model's logits before any choice (OpenAI's rule: +100 forces a token and -100
bans it in practice, as the model's own logits span far less than 100); a structured-output mask (``guided.py``)
is applied after it. Log-probabilities (``logprobs.py``) are always those of the model's raw logits: before the
bias, the mask, the temperature, top-k and top-p (vLLM's default, ``raw_logprobs``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch


@dataclass
class SamplingParams:
    """How one request decodes (OpenAI's names; ``temperature=0`` is greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # alternatives per generated token (0: the chosen token's only); None: none
    prompt_logprobs: Optional[int] = None  # the same for the prompt's tokens (echo with logprobs)
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, found {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, found {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], found {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, found {self.seed}")
        self.stop = [s for s in self.stop if s]
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")

    def child(self, index: int) -> "SamplingParams":
        """The parameters of choice ``index`` of ``n``: the seed advanced by ``index`` (mod 2^64), as vLLM does."""
        if self.seed is None or index == 0:
            return replace(self)
        seed = self.seed + index
        return replace(self, seed=seed - 2**64 if seed >= 2**64 else seed)

    def generator(self) -> Optional[torch.Generator]:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """One token per row of ``logits [n, vocab]`` (finite rows): argmax for greedy rows, a seeded draw for the others.

    Scores are shifted so the largest is 0 before dividing by the temperature: a tiny temperature then gives
    zeros for the best tokens and -inf for the rest (the argmax limit, exactly) instead of inf / inf = NaN.
    ``top_p`` keeps the smallest prefix reaching ``top_p``, and always the most likely token (``top_p=0``)."""
    out = logits.argmax(dim=-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        scores = logits[row].double()  # float64: a temperature below float32's range (1e-300) must not round to 0
        scores = (scores - scores.max()) / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest prefix reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        out[row] = int(torch.multinomial(probs, 1, generator=g))
    return out


def add_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``logits [n, vocab]`` with each row's ``logit_bias`` added (a copy when any row has one)."""
    rows = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i, bias in rows:
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def unusable_rows(logits: torch.Tensor) -> list[int]:
    """Rows of ``logits [n, vocab]`` with NaN or +inf, or nothing finite: no token can be chosen from them."""
    if bool(torch.isfinite(logits.sum())):  # one pass: any NaN or infinity makes the sum non-finite
        return []
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)
    return bad.nonzero().flatten().tolist()


class TextStream:
    """Detokenize a growing list of ids; emit only text that cannot turn out to be part of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text safe to show, whether a stop string was reached)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return "", False
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text = text[:at]
                return self._emit(len(self.text)), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold), False

    def flush(self) -> str:
        """The text held back, once generation ends for another reason than a stop string."""
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta
