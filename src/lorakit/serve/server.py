"""The OpenAI-compatible HTTP API over an ``Engine`` (FastAPI): completions and chat completions, streamed
as server-sent events or not; ``model`` names an adapter, or the base model (with ``merged_adapters``: a merge of
several, ``combos.py``). ``n`` choices are ``n`` engine requests (choice ``i`` seeded with ``seed + i``); their
answers are shaped in ``responses.py``, log-probabilities in ``logprobs.py``, ``response_format`` compiled by
``guided.py``. vLLM's ``/tokenize`` and ``/detokenize``. Adapter management follows vLLM's
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
from typing import Iterable, Optional

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import classify, metrics
from .engine import Engine, EngineError, Request
from .errors import APIError, error_response
from .guard import Guard, authorized, key_digest
from .guided import GuideError
from .logprobs import Formatter
from .responses import Choices
from .roots import AdapterRoots, PathRefused
from .sampling import SamplingParams
from .schema import (ChatBody, ChatMessage, CompletionBody, DetokenizeBody, LoadBody, TokenizeBody, UnloadBody, _Body,
                     bias_ids, check_body, check_text, prompt_bytes, unsupported)
from .users import UserAdapters

log = logging.getLogger("lorakit.serve")


def chat_prompt(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's chat template, or ``role: text`` lines ending in ``assistant:`` when it has none."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as e:  # the template refuses the conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the model's chat template refuses these messages: {e}", "messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + ("assistant:" if add_generation_prompt else "")
    return tokenizer(text)["input_ids"]


def build_app(engine: Engine, model_name: str, api_key: Optional[str] = None, allow_runtime_lora: bool = False,
              roots: Iterable = (), max_prompt_bytes: Optional[int] = None, max_body: Optional[int] = None,
              users: Optional[UserAdapters] = None, classifiers: Optional[dict] = None) -> Guard:
    """The ASGI app serving ``engine`` (FastAPI inside ``Guard``); ``model_name`` is the base model's id in ``model``.

    ``roots``: directories adapters may be loaded from over HTTP (with ``allow_runtime_lora``); their server
    paths are also removed from error messages. ``max_prompt_bytes``: UTF-8 bytes of prompt text (default 16 per
    prompt token the engine accepts, at least 64 KiB); ``max_body``: request bytes (default 4 x that + 64 KiB);
    ``users``: the per-user model, served with the adapter each request's ``user`` maps to (users.py)."""
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

    def detokenize(ids: list[int]) -> str:
        return engine.tokenizer.decode(ids)

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
        per_user = [card(users.model_name, model_name)] if users is not None else []
        return {"object": "list", "data": [card(model_name, None)] + per_user
                + [card(n, model_name) for n in engine.store.names()] + [card(n, None) for n in classifiers or {}]}

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
        echo = None
        if body.echo:
            echo = prompt if isinstance(prompt, str) else await off_loop(detokenize, ids)
        return await _generate(body, ids, http, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        check(body, chat=True)
        ids = await off_loop(chat_prompt, engine.tokenizer, body.messages)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(body, ids, http, chat=True)

    def known_model(name: Optional[str]) -> None:
        if name is not None and name != model_name and engine.store.entry(check_text(name, "model")) is None:
            raise APIError(404, f"the model '{name}' does not exist; GET /v1/models lists the base model and adapters", "model")

    def refuse_extras(body) -> None:
        bad = unsupported(body.model_extra or {})
        if bad:
            raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}", bad[0])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        """vLLM's /tokenize: a completion ``prompt`` or chat ``messages`` -> token ids (and their strings)."""
        refuse_extras(body)
        known_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", "prompt")
        if body.prompt is not None:
            size = len(check_text(body.prompt, "prompt").encode())
            special = True if body.add_special_tokens is None else body.add_special_tokens
            task = (lambda: engine.tokenizer(body.prompt, add_special_tokens=special)["input_ids"])
        else:
            for i, m in enumerate(body.messages):
                refuse_extras(m)
                check_text(m.role, f"messages[{i}].role")
                check_text(m.text(), f"messages[{i}].content")
            size = sum(len(m.text().encode()) for m in body.messages)
            task = (lambda: chat_prompt(engine.tokenizer, body.messages, body.add_generation_prompt))
        if size > max_prompt_bytes:
            raise APIError(400, f"the text is {size:,} bytes; this server accepts at most {max_prompt_bytes:,}", "prompt")
        ids = list(await off_loop(task))
        strs = await off_loop(engine.tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.config.max_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeBody):
        """vLLM's /detokenize: token ids -> text."""
        refuse_extras(body)
        known_model(body.model)
        vocab = engine.runner.vocab_size
        if len(body.tokens) > max_prompt_bytes:
            raise APIError(400, f"at most {max_prompt_bytes:,} tokens per request", "tokens")
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": await off_loop(detokenize, list(body.tokens))}

    def check(body: _Body, chat: bool) -> None:
        check_body(body, chat)
        size = prompt_bytes(body, chat)
        if size > max_prompt_bytes:
            raise APIError(400, f"the prompt is {size:,} bytes; this server accepts at most {max_prompt_bytes:,}",
                           "messages" if chat else "prompt")

    def resolve(body: _Body) -> tuple[Optional[str], Optional[tuple]]:
        """(adapter name or None, merge or None) of a request's ``model`` and ``merged_adapters``."""
        if body.merged_adapters is not None:
            if body.model != model_name:
                raise APIError(400, f"merged_adapters names the adapters to merge; set model to the base model "
                                    f"'{model_name}'", "model")
            m = body.merged_adapters
            return None, (m.ids, m.weights, m.merge_strategy)
        if body.user is not None:
            check_text(body.user, "user")
        if users is not None and body.model == users.model_name:
            return users.adapter_for(body.user), None
        adapter = None if body.model == model_name else body.model
        if adapter is not None and engine.store.entry(adapter) is None:
            raise APIError(404, f"the model '{body.model}' does not exist; GET /v1/models lists the base model and adapters", "model")
        return adapter, None

    async def _generate(body: _Body, ids: list[int], http: HTTPRequest, chat: bool, echo: Optional[str] = None):
        adapter, merge = resolve(body)
        default = 16 if not chat else max(1, min(engine.max_new, engine.config.max_len - len(ids)))
        top = body.top_logprobs_wanted()
        grammar = None
        if body.response_format is not None:
            try:
                grammar = await off_loop(engine.guides.grammar, body.response_format.model_dump(by_alias=True))
            except GuideError as e:
                raise APIError(400, str(e), "response_format") from None
        try:
            params = SamplingParams(max_tokens=body.max_tokens or default, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos, stop=body.stops(),
                                    logprobs=top, logit_bias=bias_ids(body.logit_bias, engine.runner.vocab_size))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        reqs: list[Request] = []

        def on_update(i):
            return lambda r, d: loop.call_soon_threadsafe(updates.put_nowait, (i, d, r.finish_reason is not None, len(r.output)))

        try:
            for i in range(body.n):
                p = params.child(i)
                if i == 0 and echo is not None and top is not None:
                    p.prompt_logprobs = top  # once: every choice has the same prompt
                guide = await off_loop(engine.guides.guide, grammar) if grammar is not None else None
                reqs.append(engine.submit(Request(list(ids), adapter, p, on_update=on_update(i), merge=merge, guide=guide)))
        except (EngineError, GuideError) as e:
            for r in reqs:
                engine.cancel(r)
            if isinstance(e, GuideError):
                raise APIError(400, str(e), "response_format") from None
            param = getattr(e, "param", None) or {404: "model", 400: "prompt"}.get(e.status)
            raise APIError(e.status, str(e), param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        choices = Choices(reqs, rid, body.model, chat, top, Formatter(engine.tokenizer, body.return_tokens_as_token_ids),
                          echo, include_usage)
        if body.stream:
            return StreamingResponse(_events(choices, updates), media_type="text/event-stream")
        try:
            left = len(reqs)
            while left:
                try:
                    _, _, finished, _ = await asyncio.wait_for(updates.get(), timeout=0.25)
                    left -= finished
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return error_response(499, "client closed the request")
        finally:
            for r in reqs:
                if r.finish_reason is None:  # the client left, or the server cancelled this handler: free the slot
                    engine.cancel(r)
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(failed.status, roots.redact(failed.error or "generation failed"), "model" if failed.status == 400 else None)
        return choices.whole()

    async def _events(choices: Choices, updates: asyncio.Queue):
        reqs = choices.reqs
        try:
            for i in range(len(reqs)):
                first = choices.opening(i)
                if first:
                    yield first
            left = len(reqs)
            while left:
                i, delta, finished, upto = await updates.get()
                req = reqs[i]
                if finished:
                    left -= 1
                    if req.finish_reason == "error":
                        err = {"error": {"message": roots.redact(req.error or "generation failed"), "param": None,
                                         "type": "invalid_request_error" if req.status == 400 else "server_error",
                                         "code": req.status}}
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                event = choices.chunk(i, delta, upto, req.finish_reason if finished else None)
                if event:
                    yield event
            else:
                closing = choices.closing()
                if closing:
                    yield closing
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                if r.finish_reason is None:  # the client went away, or a choice failed: free the slots
                    engine.cancel(r)

    return Guard(app, api_key, max_body or 4 * max_prompt_bytes + (1 << 16))

