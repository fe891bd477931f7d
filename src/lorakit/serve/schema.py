"""Request bodies of the OpenAI API as this server implements them, and the checks that refuse the rest.

A field the server does not implement gets 400 naming it, unless its value is the one that changes nothing
(``presence_penalty: 0``, ``best_of: 1``, ``null``): answering as if it had been honoured would be silently wrong.
Implemented beyond the basics: ``logprobs``/``top_logprobs`` (at most ``MAX_LOGPROBS``), ``n`` (at most ``MAX_N``),
``echo`` (completions), ``logit_bias`` (at most ``MAX_BIAS`` ids, values in [-100, 100]), ``response_format``
(``json_object``, ``json_schema``), ``stream_options.include_usage`` (with ``stream`` only), vLLM's
``return_tokens_as_token_ids``, and LoRAX's ``merged_adapters`` (``MAX_MERGE`` adapters, weights in
[-``MAX_WEIGHT``, ``MAX_WEIGHT``], the exact strategies of ``MERGE_STRATEGIES``). Numbers outside their range, NaN and infinities, seeds beyond 64 bits, strings with lone
surrogates (not Unicode text), content parts that are not text, more than ``MAX_STOP`` stop strings or longer
than ``MAX_STOP_CHARS``, and prompts over the byte limit are refused too, before anything reaches the engine.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .errors import APIError

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)
MAX_BIAS = 300  # logit_bias entries
MAX_MERGE = 8  # adapters in one merged_adapters
MAX_WEIGHT = 100.0  # |weight| of one adapter in merged_adapters
MERGE_STRATEGIES = ("linear", "task_arithmetic", "cat")  # merges whose low-rank factors are exact (lorakit.merging)
ROLES = ("system", "developer", "user", "assistant")
# fields of the OpenAI API this server does not implement, and the values that leave the answer unchanged
NEUTRAL: dict[str, tuple] = {
    "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}),
    "reasoning_effort": (None,), "modalities": (None, ["text"]), "prediction": (None,), "audio": (None,),
    "web_search_options": (None,), "name": (None,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr = Field("response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[StrictStr] = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge: adapter names, their weights (default 1 each) and an exact strategy."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ids: list[Annotated[StrictStr, Field(min_length=1, max_length=200)]] = Field(min_length=1, max_length=MAX_MERGE)
    weights: Optional[list[Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]]] = None
    merge_strategy: StrictStr = "linear"
    density: float = 1.0
    majority_sign_method: StrictStr = "total"


Bias = Annotated[float, Field(ge=-100, le=100)]


class _Body(_Strict):
    model: StrictStr
    user: Optional[StrictStr] = Field(None, max_length=256)  # picks the adapter of the per-user model (users.py)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=-(2**63), lt=2**64)
    ignore_eos: bool = False
    logit_bias: Optional[dict[StrictStr, Bias]] = Field(None, max_length=MAX_BIAS)
    response_format: Optional[ResponseFormat] = None
    return_tokens_as_token_ids: StrictBool = False
    merged_adapters: Optional[MergedAdapters] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each", "stop")
        for s in stops:
            check_text(s, "stop")
        return stops


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False

    def top_logprobs_wanted(self) -> Optional[int]:
        return self.logprobs


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
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_wanted(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeBody(_Strict):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages``."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[StrictBool] = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeBody(_Strict):
    """vLLM's ``/detokenize``."""

    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


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
    merged = body.merged_adapters
    if merged is not None and merged.density != 1:
        bad.append("merged_adapters.density")
    if merged is not None and merged.majority_sign_method != "total":
        bad.append("merged_adapters.majority_sign_method")
    if bad:
        raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}; this server does not implement them "
                            "(docs/serving.md lists what it does)", bad[0])
    if body.stream_options is not None:
        if not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(body.stream_options.get("include_usage", False), bool):
            raise APIError(400, "stream_options.include_usage must be true or false", "stream_options.include_usage")
    if chat and body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if merged is not None:
        check_merge(merged)
    check_text(body.model, "model")
    if chat:
        for i, m in enumerate(body.messages):
            check_text(m.role, f"messages[{i}].role")
            check_text(m.text(), f"messages[{i}].content")
    else:
        for p in [body.prompt] if isinstance(body.prompt, str) else body.prompt:
            if isinstance(p, str):
                check_text(p, "prompt")


def check_merge(merged: MergedAdapters) -> None:
    """Strategy in the exact allow-list, one weight per adapter, no adapter twice."""
    if merged.merge_strategy not in MERGE_STRATEGIES:
        raise APIError(400, f"merged_adapters.merge_strategy {merged.merge_strategy!r} is not served: the server merges "
                            f"only where the merged low-rank factors are exact ({', '.join(MERGE_STRATEGIES)}); merge "
                            "others offline (`lorakit merge A B --method ties -o DIR`) and load DIR",
                       "merged_adapters.merge_strategy")
    if merged.weights is not None and len(merged.weights) != len(merged.ids):
        raise APIError(400, f"merged_adapters has {len(merged.ids)} ids and {len(merged.weights)} weights; give one "
                            "weight per adapter", "merged_adapters.weights")
    for name in merged.ids:
        check_text(name, "merged_adapters.ids")
    if len(set(merged.ids)) != len(merged.ids):
        raise APIError(400, "merged_adapters.ids names an adapter twice; give it one weight", "merged_adapters.ids")
    weights = merged.weights or [1.0] * len(merged.ids)
    if merged.merge_strategy == "linear" and abs(sum(weights)) < 1e-6:
        raise APIError(400, f"linear averages with weights / sum(weights), and {weights} sum to zero; use "
                            "task_arithmetic", "merged_adapters.weights")


def bias_ids(bias: Optional[dict[str, float]], vocab: int) -> dict[int, float]:
    """``logit_bias`` with its keys as token ids, each a decimal integer in ``[0, vocab)``."""
    out = {}
    for key, value in (bias or {}).items():
        if not (0 < len(key) <= 10 and key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise APIError(400, f"logit_bias key {key[:40]!r} is not a token id in [0, {vocab})", "logit_bias")
        out[int(key)] = float(value)
    return out


def prompt_bytes(body: _Body, chat: bool) -> int:
    """UTF-8 bytes of the prompt text (token-id prompts count 0: their length is limited in tokens)."""
    if chat:
        return sum(len(m.text().encode()) for m in body.messages)
    return sum(len(p.encode()) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt) if isinstance(p, str))
