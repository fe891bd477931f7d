"""Request bodies of the OpenAI API as this server implements them, and the checks that refuse the rest.

A field the server does not implement gets 400 naming it, unless its value is the one that changes nothing
(``logprobs: false``, ``presence_penalty: 0``, ``n: 1``, ``null``): answering as if it had been honoured would
be silently wrong. Numbers outside their range, NaN and infinities, seeds beyond 64 bits, strings with lone
surrogates (not Unicode text), content parts that are not text, more than ``MAX_STOP`` stop strings or longer
than ``MAX_STOP_CHARS``, and prompts over the byte limit are refused too, before anything reaches the engine.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .errors import APIError

MAX_STOP = 16
MAX_STOP_CHARS = 256
ROLES = ("system", "developer", "user", "assistant")
# fields of the OpenAI API this server does not implement, and the values that leave the answer unchanged
NEUTRAL: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "user": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}),
    "reasoning_effort": (None,), "modalities": (None, ["text"]), "prediction": (None,), "audio": (None,),
    "web_search_options": (None,), "name": (None,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class _Body(_Strict):
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=-(2**63), lt=2**64)
    ignore_eos: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each", "stop")
        for s in stops:
            check_text(s, "stop")
        return stops


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: StrictStr
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


NAME = r"^[^\x00-\x1f\x7f]+$"  # adapter names: no control characters (lone surrogates: check_text)


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: StrictStr = Field(min_length=1, max_length=200, pattern=NAME)
    lora_path: StrictStr = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: StrictStr = Field(min_length=1, max_length=200)


def check_text(text: str, param: str) -> str:
    """Refuse strings that are not Unicode text (lone surrogates cannot be encoded, nor tokenised)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode text: a lone surrogate {text[e.start]!r} at index {e.start}",
                       param) from None
    return text


def unsupported(fields: dict[str, Any], where: str = "") -> list[str]:
    """The names among ``fields`` (a model's extras) that ask for something this server does not do."""
    def neutral(v, n) -> bool:  # 0 == 0.0 is neutral, True == 1 is not
        return v is None if n is None else (v == n and isinstance(v, bool) == isinstance(n, bool))

    return [where + k for k, v in fields.items() if not any(neutral(v, n) for n in NEUTRAL.get(k, ()))]


def check_body(body: _Body, chat: bool) -> None:
    """400 naming every unsupported parameter, then the value checks the field types do not make."""
    bad = unsupported(body.model_extra or {})
    if chat:
        for i, m in enumerate(body.messages):
            bad += unsupported(m.model_extra or {}, f"messages[{i}].")
            if m.role not in ROLES:
                bad.append(f"messages[{i}].role={m.role!r}")
    extra_options = set(body.stream_options or {}) - {"include_usage"}
    bad += [f"stream_options.{k}" for k in sorted(extra_options)]
    if bad:
        raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}; this server does not implement them "
                            "(docs/serving.md lists what it does)", bad[0])
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    check_text(body.model, "model")
    if chat:
        for i, m in enumerate(body.messages):
            check_text(m.role, f"messages[{i}].role")
            check_text(m.text(), f"messages[{i}].content")
    else:
        for p in [body.prompt] if isinstance(body.prompt, str) else body.prompt:
            if isinstance(p, str):
                check_text(p, "prompt")


def prompt_bytes(body: _Body, chat: bool) -> int:
    """UTF-8 bytes of the prompt text (token-id prompts count 0: their length is limited in tokens)."""
    if chat:
        return sum(len(m.text().encode()) for m in body.messages)
    return sum(len(p.encode()) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt) if isinstance(p, str))
