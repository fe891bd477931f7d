"""The OpenAI-compatible HTTP API over an ``Engine`` (FastAPI): completions and chat completions, streamed
as server-sent events or not; ``model`` names an adapter, or the base model. Adapter management follows vLLM's
endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``); ``/health``; ``/metrics`` (Prometheus).

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: malformed JSON or fields 400,
missing or wrong key 401, unknown model 404, queue full 429. A client that goes away mid-request cancels it, which
frees its slot in the running batch.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics
from .engine import Engine, EngineError, Request
from .sampling import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_exceeded", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    ignore_eos: bool = False


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict], None] = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadBody(BaseModel):
    lora_name: str = Field(min_length=1)


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The tokenizer's chat template, or ``role: text`` lines ending in ``assistant:`` when it has none."""
    plain = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            p.get("text", "") for p in m.content if p.get("type") == "text")
        plain.append({"role": m.role, "content": content or ""})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
    return tokenizer(text)["input_ids"]


def build_app(engine: Engine, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``model_name`` is the id of the base model in ``model``."""
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', 'malformed body')}" + (f" ({where})" if where else ""), where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = lambda i, parent, root: {"id": i, "object": "model", "created": created, "owned_by": "lorakit",  # noqa: E731
                                        "root": root, "parent": parent}
        data = [card(model_name, None, model_name)]
        data += [card(n, model_name, str(engine.store.entry(n).path)) for n in engine.store.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadBody):
        if engine.store.entry(body.lora_name) is not None and not body.load_inplace:
            raise APIError(400, f"adapter '{body.lora_name}' is already loaded; unload it first or pass load_inplace=true")
        if body.lora_name == model_name:
            raise APIError(400, f"'{model_name}' names the base model")
        try:
            await run_in_threadpool(engine.add_adapter, body.lora_name, body.lora_path)
        except Exception as e:
            raise APIError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadBody):
        if not engine.remove_adapter(body.lora_name):
            raise APIError(404, f"adapter '{body.lora_name}' is not loaded", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request", "prompt")
            prompt = prompt[0]
        ids = engine.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        return await _generate(body, ids, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        ids = chat_prompt(engine.tokenizer, body.messages)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(body, ids, http, chat=True)

    async def _generate(body: _Body, ids: list[int], http: HTTPRequest, chat: bool):
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        adapter = None if body.model == model_name else body.model
        if adapter is not None and engine.store.entry(adapter) is None:
            raise APIError(404, f"the model '{body.model}' does not exist; GET /v1/models lists the base model and adapters", "model")
        default = 16 if not chat else max(1, min(engine.max_new, engine.config.max_len - len(ids)))
        try:
            params = SamplingParams(max_tokens=body.max_tokens or default, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos,
                                    stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        req = Request(ids, adapter, params, on_update=lambda r, d: loop.call_soon_threadsafe(updates.put_nowait, (d, r.finish_reason is not None)))
        try:
            engine.submit(req)
        except EngineError as e:
            raise APIError(e.status, str(e), "model" if e.status == 404 else None) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(req, updates, rid, body.model, chat, usage), media_type="text/event-stream")
        finished = False
        while not finished:
            try:
                _, finished = await asyncio.wait_for(updates.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    engine.cancel(req)
                    return error_response(499, "client closed the request")
        if req.finish_reason == "error":
            raise APIError(400 if "cannot be loaded" in (req.error or "") else 500, req.error or "generation failed")
        choice = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": req.text}} if chat else {"text": req.text})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": _usage(req)}

    async def _events(req: Request, updates: asyncio.Queue, rid: str, model: str, chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            finished = False
            while not finished:
                delta, finished = await updates.get()
                if delta:
                    yield chunk(delta, None)
            if req.finish_reason == "error":
                err = {"error": {"message": req.error, "type": "server_error", "param": None, "code": 500}}
                yield f"data: {json.dumps(err)}\n\n"
            else:
                yield chunk(None, req.finish_reason)
                if usage:
                    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
                            "usage": _usage(req)}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if req.finish_reason is None:  # the client went away: free the slot
                engine.cancel(req)

    return app


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output)}
