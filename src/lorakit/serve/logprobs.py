"""Log-probabilities of chosen tokens and their most likely alternatives, and OpenAI's two shapes for them.

The values are ``log_softmax`` of the model's raw logits in float32 (before ``logit_bias``, a structured-output
mask, the temperature, top-k and top-p: vLLM's default ``raw_logprobs``), for the token that was chosen and the
``k`` most likely tokens, sorted from the most likely down (ties: the lower id first). Prompt tokens get the same
from the logits at the position before them; the first prompt token has none (``null``).

Shapes: completions (``logprobs: k``) answer ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, each
``top_logprobs`` entry a dict of the ``k`` most likely tokens plus the chosen one (so ``k + 1`` entries at most);
chat (``logprobs: true, top_logprobs: k``) answers ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}]}``. A token is its own decoded text, or ``token_id:ID`` with vLLM's
``return_tokens_as_token_ids`` (two ids can decode to the same text; ids never collide).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token, its log-probability and the ``k`` most likely (id, logprob) pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def pick(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Per row of ``logits [n, vocab]``: the log-probability of ``tokens[row]`` and the ``k`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if not k:
        return [TokenLogprob(t, c, ()) for t, c in zip(tokens, chosen)]
    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    # equal log-probabilities in increasing id order (topk does not promise an order among ties)
    tops = [tuple(sorted(zip(i, v), key=lambda p: (-p[1], p[0]))) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def prompt_records(logits_of, prompt: Sequence[int], k: int, chunk: int = 64) -> list[Optional[TokenLogprob]]:
    """``None`` then, for each later prompt token, its record from the logits before it; ``logits_of(lo, hi)``
    gives the logits after prompt positions ``[lo, hi)`` (computed ``chunk`` positions at a time)."""
    out: list[Optional[TokenLogprob]] = [None]
    for lo in range(0, len(prompt) - 1, chunk):
        hi = min(lo + chunk, len(prompt) - 1)
        out += pick(logits_of(lo, hi), list(prompt[lo + 1:hi + 1]), k)
    return out


class Formatter:
    """Token strings for one request's logprobs (decoded text, or ``token_id:ID``)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.end = 0

    def text(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.tokenizer.decode([token])

    def completion(self, records: Sequence[tuple[Optional[TokenLogprob], int]], offset: int = 0) -> dict:
        """The completions shape of (record, token) pairs; ``offset`` is the character offset of the first token
        in the choice's text (offsets count each token's own decoded text; ``self.end`` is the offset after)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for rec, token in records:
            text = self.text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(self.tokenizer.decode([token], skip_special_tokens=True))
            if rec is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.text(i): v for i, v in rec.top}
            top.setdefault(text, rec.logprob)
            out["token_logprobs"].append(rec.logprob)
            out["top_logprobs"].append(top)
        self.end = offset
        return out

    def chat(self, records: Sequence[TokenLogprob]) -> dict:
        """The chat shape."""
        def entry(token: int, value: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": value, "bytes": list(self.tokenizer.decode([token]).encode())}

        return {"content": [{**entry(r.token, r.logprob), "top_logprobs": [entry(i, v) for i, v in r.top]}
                            for r in records]}
