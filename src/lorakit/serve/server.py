"""The OpenAI-compatible HTTP API over an ``Engine`` (FastAPI): completions and chat completions, streamed
as server-sent events or not; ``model`` names an adapter, or the base model. Adapter management follows vLLM's
endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), off unless ``allow_runtime_lora`` and then
only for directories under ``roots`` (``roots.py``); ``/health``; ``/metrics`` (Prometheus).

Errors use OpenAI's body (``errors.py``): malformed JSON, fields or unsupported parameters 400, missing or wrong
key 401 (``guard.py``, on every route), runtime adapter loading off 403, unknown model 404, body too large 413,
queue full 429, shutting down 503 (429 and 503 with Retry-After). Prompts are tokenised on a worker thread, never
on the event loop. A client that goes away mid-request, streamed or not, cancels it, which frees its slot in the
running batch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import classify, metrics
from .engine import Engine, EngineError, Request
from .errors import APIError, error_response
from .guard import Guard, authorized, key_digest
from .roots import AdapterRoots, PathRefused
from .sampling import SamplingParams
from .schema import (ChatBody, ChatMessage, CompletionBody, LoadBody, UnloadBody, _Body, check_body, check_text,
                     prompt_bytes)

log = logging.getLogger("lorakit.serve")


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The tokenizer's chat template, or ``role: text`` lines ending in ``assistant:`` when it has none."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template refuses the conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the model's chat template refuses these messages: {e}", "messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
    return tokenizer(text)["input_ids"]


def build_app(engine: Engine, model_name: str, api_key: Optional[str] = None, allow_runtime_lora: bool = False,
              roots: Iterable = (), max_prompt_bytes: Optional[int] = None, max_body: Optional[int] = None,
              classifiers: Optional[dict] = None) -> Guard:
    """The ASGI app serving ``engine`` (FastAPI inside ``Guard``); ``model_name`` is the base model's id in ``model``.

    ``roots``: directories adapters may be loaded from over HTTP (with ``allow_runtime_lora``); their server
    paths are also removed from error messages. ``max_prompt_bytes``: UTF-8 bytes of prompt text (default 16 per
    prompt token the engine accepts, at least 64 KiB); ``max_body``: request bytes (default 4 x that + 64 KiB)."""
    roots = roots if isinstance(roots, AdapterRoots) else AdapterRoots(roots)
    max_prompt_bytes = max_prompt_bytes or max(1 << 16, 16 * engine.max_prompt)
    digest = key_digest(api_key.encode()) if api_key else None

    async def require_key(request: HTTPRequest) -> None:  # the Guard checked already; this holds if it is bypassed
        if digest is not None and not authorized(request.scope.get("headers", []), digest):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_key)])
    created = int(time.time())
    # tokenising is CPU work: two threads of its own keep it off the event loop without a thread per request
    tokenizing = ThreadPoolExecutor(2, thread_name_prefix="lorakit-tokenize")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"invalid request: {first.get('msg', 'malformed body')}" + (f" ({where})" if where else "")
        return error_response(400, message, where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):  # never a traceback or a server path to the client
        log.error("request failed", exc_info=e)
        return error_response(500, "internal server error")

    @app.get("/health")
    async def health():
        if engine._thread is not None and engine._thread.is_alive() and not engine._stop:
            return JSONResponse({"status": "ok"})
        return error_response(503, "the engine is not running")

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = lambda i, parent: {"id": i, "object": "model", "created": created, "owned_by": "lorakit",  # noqa: E731
                                  "root": i, "parent": parent}
        return {"object": "list", "data": [card(model_name, None)] + [card(n, model_name) for n in engine.store.names()]
                + [card(n, None) for n in classifiers or {}]}

    if classifiers:
        classify.add_routes(app, classifiers, max_prompt_bytes)

    def runtime_lora() -> None:
        if not allow_runtime_lora:
            raise APIError(403, "loading and unloading adapters over HTTP is off; the operator enables it with "
                                "`lorakit serve --allow-runtime-lora --lora-root DIR`")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadBody):
        runtime_lora()
        check_text(body.lora_name, "lora_name")
        if body.lora_name == model_name:
            raise APIError(400, f"'{model_name}' names the base model", "lora_name")
        if engine.store.entry(body.lora_name) is not None and not body.load_inplace:
            raise APIError(400, f"adapter '{body.lora_name}' is already loaded; unload it first or pass load_inplace=true")
        try:
            path = roots.resolve(body.lora_path)
            await run_in_threadpool(engine.add_adapter, body.lora_name, path)
        except PathRefused as e:
            raise APIError(400, str(e), "lora_path") from None
        except Exception as e:
            raise APIError(400, roots.redact(str(e)), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadBody):
        runtime_lora()
        if not engine.remove_adapter(body.lora_name):
            raise APIError(404, f"adapter '{body.lora_name}' is not loaded", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check(body, chat=False)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):  # a tokenizer call can take a while: never on the event loop
            ids = (await off_loop(engine.tokenizer, prompt))["input_ids"]
        else:
            ids = list(prompt)
        return await _generate(body, ids, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        check(body, chat=True)
        ids = await off_loop(chat_prompt, engine.tokenizer, body.messages)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(body, ids, http, chat=True)

    def check(body: _Body, chat: bool) -> None:
        check_body(body, chat)
        size = prompt_bytes(body, chat)
        if size > max_prompt_bytes:
            raise APIError(400, f"the prompt is {size:,} bytes; this server accepts at most {max_prompt_bytes:,}",
                           "messages" if chat else "prompt")

    async def _generate(body: _Body, ids: list[int], http: HTTPRequest, chat: bool):
        adapter = None if body.model == model_name else body.model
        if adapter is not None and engine.store.entry(adapter) is None:
            raise APIError(404, f"the model '{body.model}' does not exist; GET /v1/models lists the base model and adapters", "model")
        default = 16 if not chat else max(1, min(engine.max_new, engine.config.max_len - len(ids)))
        try:
            params = SamplingParams(max_tokens=body.max_tokens or default, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos, stop=body.stops())
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        req = Request(ids, adapter, params, on_update=lambda r, d: loop.call_soon_threadsafe(updates.put_nowait, (d, r.finish_reason is not None)))
        try:
            engine.submit(req)
        except EngineError as e:
            raise APIError(e.status, str(e), {404: "model", 400: "prompt"}.get(e.status)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(req, updates, rid, body.model, chat, usage), media_type="text/event-stream")
        try:
            finished = False
            while not finished:
                try:
                    _, finished = await asyncio.wait_for(updates.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return error_response(499, "client closed the request")
        finally:
            if req.finish_reason is None:  # the client left, or the server cancelled this handler: free the slot
                engine.cancel(req)
        if req.finish_reason == "error":
            raise APIError(req.status, roots.redact(req.error or "generation failed"), "model" if req.status == 400 else None)
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
                err = {"error": {"message": roots.redact(req.error or "generation failed"), "param": None,
                                 "type": "invalid_request_error" if req.status == 400 else "server_error", "code": req.status}}
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

    return Guard(app, api_key, max_body or 4 * max_prompt_bytes + (1 << 16))


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output)}
