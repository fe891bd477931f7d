"""What the engine is given and what it answers: its configuration, one request's record, and its refusals."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .sampling import SamplingParams, TextStream


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status it maps to."""

    status = 400


class BadParameter(EngineError):
    """A request parameter the engine refuses (``param`` names it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnknownAdapter(EngineError):
    status = 404


class QueueFull(EngineError):
    status = 429


class Stopped(EngineError):
    status = 503


@dataclass
class EngineConfig:
    """Limits and budgets of one engine."""

    max_batch: int = 32  # running requests (KV slots)
    max_len: int = 1024  # prompt plus generated tokens of one request
    max_prefill_tokens: int = 2048  # padded prompt tokens in one prefill forward
    max_queue: int = 1024  # queued requests before submissions get QueueFull
    max_prompt_tokens: Optional[int] = None  # default: max_len - 1
    max_tokens: Optional[int] = None  # cap on a request's max_tokens; default: max_len - 1
    pool_bytes: int = 64 << 20  # active adapter pool
    host_bytes: int = 4 << 30  # host cache of packed adapters
    prefetch: bool = True  # load adapter files on a background thread (else inside the step loop)
    lookahead: int = 64  # queued requests whose adapters are prefetched
    lora_dtype: torch.dtype = torch.float32
    backend: str = "auto"  # batched LoRA operator: auto, bmm, grouped, segments
    max_merged: int = 64  # per-request merged adapters the server keeps buildable (combos.MergeCache)
    max_adapter_labels: int = 256  # adapters with their own label in /metrics; the rest count under kind="other"


@dataclass(eq=False)
class Request:
    """One generation request and everything the engine records about it."""

    prompt: list[int]
    adapter: Optional[str] = None  # adapter name; None = the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    on_update: Optional[Callable[["Request", str], None]] = None  # called from the engine thread with new text
    id: str = ""
    aid: Optional[str] = None
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # stop, length, cancelled, error
    error: Optional[str] = None
    status: int = 500  # the HTTP status of an error: 400 when the request's adapter is at fault
    arrival: float = 0.0
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    token_times: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    holds_adapter: bool = False  # the request pins its adapter in the pool
    stream: Optional[TextStream] = None
    generator: Optional[torch.Generator] = None
    merge: Optional[tuple] = None  # (adapter names, weights or None, strategy): a per-request merged adapter
    guide: Any = None  # guided.Guide: the structured-output matcher
    logprobs: list = field(default_factory=list)  # logprobs.TokenLogprob per generated token
    prompt_logprobs: list = field(default_factory=list)  # None, then a TokenLogprob per later prompt token
    label: tuple[str, str] = ("base", "")  # (kind, adapter) of its /metrics counters


def check_request(request: Request, vocab: int, max_prompt: int, max_new: int, max_len: int) -> None:
    """Raise EngineError (BadParameter for logit_bias) for a prompt or parameters the engine cannot serve."""
    n, m = len(request.prompt), request.params.max_tokens
    problem = None
    if n == 0:
        problem = "the prompt is empty"
    elif any(not (isinstance(t, int) and 0 <= t < vocab) for t in request.prompt):
        t = next(t for t in request.prompt if not (isinstance(t, int) and 0 <= t < vocab))
        problem = f"token id {t!r} is outside the vocabulary [0, {vocab})"
    elif n > max_prompt:
        problem = f"the prompt has {n} tokens; this server accepts at most {max_prompt}"
    elif m > max_new:
        problem = f"max_tokens={m} exceeds this server's limit of {max_new}"
    elif n + m > max_len:
        problem = f"prompt ({n} tokens) plus max_tokens ({m}) exceeds the context length {max_len}"
    if problem:
        raise EngineError(problem)
    bad = next((t for t in request.params.logit_bias if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadParameter(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})", "logit_bias")
