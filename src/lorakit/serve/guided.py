"""Structured output: ``response_format`` (``json_object``, ``json_schema``) as a token mask at every step.

The grammar engine is llguidance (Microsoft's guidance-ai; the structured-output backend vLLM and SGLang ship):
a JSON schema compiles to a grammar over the tokenizer's byte strings, and a matcher per request gives, at every
step, the set of tokens that keep the output a prefix of a valid document; the engine sets every other logit to
-inf before sampling, and feeds the chosen token back. The end-of-sequence token is allowed only once the document
is complete, and the request stops as soon as the grammar is finished. ``json_object`` is the schema
``{"type": "object"}``. JSON is written without optional whitespace (``whitespace_flexible`` off), so the output is
bounded by the schema's own bounds (``maxLength``, ``enum``, ``maximum``, ...), and by ``max_tokens`` otherwise:
an output cut by ``max_tokens`` ends with ``finish_reason: "length"`` and is a prefix, as with OpenAI.

llguidance is an optional dependency (``pip install 'lorakit[serve]'``); without it, or with a tokenizer it cannot
read (it needs a Hugging Face fast tokenizer), a request with ``response_format`` gets 400 saying so.
"""
from __future__ import annotations

import json
import threading
from typing import Optional

import torch


class GuideError(ValueError):
    """A response_format this server cannot enforce (bad schema, no llguidance, unsupported tokenizer)."""


class Guide:
    """One request's matcher: ``allowed()`` before each step, ``advance(token)`` after it."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def mask_(self, row: torch.Tensor) -> torch.Tensor:
        """Set the logits of tokens the grammar forbids now to -inf, in place (``row [vocab]``)."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8, device="cpu")) & 1).flatten().bool().to(row.device)
        allowed = allowed[:row.numel()] if allowed.numel() >= row.numel() else torch.cat(
            [allowed, allowed.new_zeros(row.numel() - allowed.numel())])
        return row.masked_fill_(~allowed, float("-inf"))

    def advance(self, token: int) -> bool:
        """Feed the chosen token; returns whether the document is finished. Raises if the grammar refuses it."""
        if not self.matcher.consume_token(token):
            raise GuideError(f"the structured-output grammar refused token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


def apply_guides(scores: torch.Tensor, guides, copy: bool) -> tuple[torch.Tensor, list[int]]:
    """Mask each guided row of ``scores [n, vocab]`` (a copy first if ``copy``); returns the scores and the rows
    left with no allowed token."""
    rows = [i for i, g in enumerate(guides) if g is not None]
    if not rows:
        return scores, []
    scores = scores.clone() if copy else scores
    for i in rows:
        guides[i].mask_(scores[i])
    return scores, [i for i in rows if not torch.isfinite(scores[i]).any()]


class GuideFactory:
    """Compiles ``response_format`` into grammars for one tokenizer (the tokenizer is converted once, lazily)."""

    def __init__(self, tokenizer, vocab: int, eos: Optional[int]):
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, eos
        self._lltok = None
        self._lock = threading.Lock()

    def _llguidance_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise GuideError("response_format needs llguidance on the server (pip install 'lorakit[serve]')") from None
                try:
                    self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=self.eos)
                except Exception as e:
                    raise GuideError(f"response_format is not available for this model's tokenizer: {e}") from None
            return self._lltok

    def grammar(self, response_format: dict) -> Optional[str]:
        """The grammar of a validated ``response_format`` (None for ``text``); raises GuideError if it is unusable."""
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if spec is None:
                raise GuideError("response_format of type json_schema needs json_schema: {name, schema}")
            schema = spec["schema"]
        elif response_format.get("json_schema") is not None:
            raise GuideError("response_format of type json_object takes no json_schema")
        else:
            schema = {"type": "object"}
        import llguidance

        tok = self._llguidance_tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"whitespace_flexible": False})
            problem = llguidance.LLMatcher.validate_grammar(grammar, tok)  # "" when the grammar is usable
        except Exception as e:
            problem = str(e) or type(e).__name__
        if problem:
            raise GuideError(f"response_format.json_schema.schema cannot be enforced: {problem[:500]}")
        return grammar

    def guide(self, grammar: str) -> Guide:
        """A fresh matcher for one request (or one choice of it)."""
        import llguidance

        try:
            matcher = llguidance.LLMatcher(self._llguidance_tokenizer(), grammar, log_level=0)
        except GuideError:
            raise
        except Exception as e:
            raise GuideError(f"response_format cannot be enforced: {e}") from None
        if matcher.is_error():
            raise GuideError(f"response_format cannot be enforced: {matcher.get_error()}")
        return Guide(matcher, self.vocab)
