"""OpenAI's answer shapes for one request of ``n`` choices: whole answers, streamed chunks and usage.

A ``Choices`` holds the engine requests of one HTTP request (choice ``i`` is request ``i``) and what each has
streamed so far. Completions with ``echo`` put the prompt text before each choice's text, and with ``logprobs``
the prompt tokens' log-probabilities before the generated ones (the first one ``null``); streamed, the prompt comes
in each choice's first chunk. Every chunk carries the log-probabilities of the tokens generated since the previous
chunk of its choice; with ``stream_options.include_usage`` every chunk has ``"usage": null`` and one last chunk,
with no choices, the usage of the whole request (the prompt counted once, the completions of all choices summed).
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

from .logprobs import Formatter
from .request import Request


class Choices:
    """The choices of one request and their formatting."""

    def __init__(self, reqs: Sequence[Request], rid: str, model: str, chat: bool, top: Optional[int],
                 formatter: Formatter, echo: Optional[str] = None, include_usage: bool = False):
        self.reqs, self.rid, self.model, self.chat, self.top = list(reqs), rid, model, chat, top
        self.formatter, self.echo, self.include_usage = formatter, echo, include_usage
        self.sent = [0] * len(reqs)  # tokens whose logprobs were streamed, per choice
        self.offset = [0] * len(reqs)  # text_offset of the next streamed token, per choice
        self.created = int(time.time())

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict:
        prompt, done = len(self.reqs[0].prompt), sum(len(r.output) for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _prompt_items(self) -> list:
        req = self.reqs[0]  # the prompt's logprobs are computed once, by the first choice
        return list(zip(req.prompt_logprobs, req.prompt)) if self.echo is not None else []

    def _logprobs(self, i: int, lo: int, hi: int, with_prompt: bool = False) -> Optional[dict]:
        if self.top is None:
            return None
        records = self.reqs[i].logprobs[lo:hi]
        if self.chat:
            return self.formatter.chat(records)
        items = (self._prompt_items() if with_prompt else []) + [(r, r.token) for r in records]
        return self.formatter.completion(items, self.offset[i])

    def whole(self) -> dict:
        """The non-streamed answer."""
        choices = []
        for i, req in enumerate(self.reqs):
            choice: dict[str, Any] = {"index": i, "finish_reason": req.finish_reason,
                                      "logprobs": self._logprobs(i, 0, len(req.logprobs), with_prompt=True)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": req.text}
            else:
                choice["text"] = (self.echo or "") + req.text
            choices.append(choice)
        return {"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _event(self, choices: list, usage: Any = None) -> str:
        body = {"id": self.rid, "object": self.kind + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def opening(self, i: int) -> Optional[str]:
        """Choice ``i``'s first chunk: the assistant role (chat) or the echoed prompt (completions), or nothing."""
        if self.chat:
            return self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
        if self.echo is None:
            return None
        logprobs = None
        if self.top is not None:
            logprobs = self.formatter.completion(self._prompt_items(), 0)
            self.offset[i] = self.formatter.end
        return self._event([{"index": i, "text": self.echo, "logprobs": logprobs, "finish_reason": None}])

    def chunk(self, i: int, text: str, upto: int, finish: Optional[str] = None) -> Optional[str]:
        """Choice ``i``'s chunk with new ``text``, the logprobs of its tokens up to ``upto``, and ``finish``."""
        logprobs = self._logprobs(i, self.sent[i], upto)
        self.sent[i] = max(self.sent[i], upto)
        if logprobs is not None and not self.chat:
            self.offset[i] = self.formatter.end
        if not text and finish is None and not (logprobs and (logprobs.get("content") or logprobs.get("tokens"))):
            return None
        if self.chat:
            choice = {"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._event([choice])

    def closing(self) -> Optional[str]:
        """The usage chunk (with ``include_usage``)."""
        return self._event([], self.usage()) if self.include_usage else None
