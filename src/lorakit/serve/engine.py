"""The serving engine: iteration-level (continuous) batching of generation requests over many adapters.

Each iteration of the step loop (one thread): take new submissions and cancellations; ask the prefetch thread
for the adapters of the next ``lookahead`` queued requests; admit queued requests first come, first served, while
KV slots, the prefill token budget and the adapter pool allow (a request whose adapter is still on disk waits
without holding up the others; one whose adapter cannot be made resident without evicting an adapter in use
waits too); prefill the admitted ones in one forward; then decode one token for every running request in one
forward. Finished requests free their slot at once, so the next iteration can admit more.

Request features are small modules the loop calls: ``sampling`` (logit_bias, temperature, top-k, top-p),
``guided`` (structured-output masks), ``logprobs`` (raw log-probabilities of chosen and likely tokens, of the
prompt too for echo), ``combos`` (per-request merged adapters, built in the store and cached like adapters);
``features.RequestFeatures`` applies them to each forward's logits.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from typing import Optional, Sequence

from . import combos
from .devices import model_device
from .features import RequestFeatures
from .guided import GuideFactory
from .metrics import AdapterCounters
from .moe import ParameterHooks, parameter_shapes
from .pool import AdapterPool, PoolFull
from .request import EngineConfig, EngineError, QueueFull, Request, Stopped, UnknownAdapter, check_request
from .runner import ModelRunner
from .sampling import SamplingParams, TextStream
from .store import AdapterFitError, AdapterStore

__all__ = ["Engine", "EngineConfig", "EngineError", "QueueFull", "Request", "Stopped", "UnknownAdapter"]

log = logging.getLogger("lorakit.serve")


class Engine(RequestFeatures):
    """Continuous batching of requests, each with its own adapter, on one base model."""

    def __init__(self, model, tokenizer, config: Optional[EngineConfig] = None, store: Optional[AdapterStore] = None,
                 runner: Optional[ModelRunner] = None):
        self.config = c = config or EngineConfig()
        self.tokenizer = tokenizer
        self.device = model_device(model)
        self.pool = AdapterPool(c.pool_bytes, c.lora_dtype, device=self.device)
        self.runner = runner or ModelRunner(model, self.pool, c.max_batch, c.max_len, c.backend)
        self.store = store or AdapterStore(self.runner.shapes, c.lora_dtype, c.host_bytes, c.prefetch, device=self.device,
                                           params=parameter_shapes(model))
        self.parameter_hooks = ParameterHooks(self.runner) if self.runner.needs_pool else None  # MoE expert adapters
        self.max_prompt = c.max_prompt_tokens or c.max_len - 1
        self.max_new = c.max_tokens or c.max_len - 1
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._inbox: deque[Request] = deque()
        self._retired: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._ids = itertools.count()
        self.stats = {"requests": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0, "prompt_tokens": 0,
                      "generated_tokens": 0, "prefill_steps": 0, "decode_steps": 0, "step_seconds": 0.0,
                      "pool_hits": 0, "pool_misses": 0, "load_stall_seconds": 0.0, "sync_loads": 0}
        self.token_log: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) per step, for tokens/s
        self.merges = combos.MergeCache(self.store, c.max_merged, on_evict=self._retire)
        self.guides = GuideFactory(tokenizer, self.runner.vocab_size, tokenizer.eos_token_id)
        self.counters = AdapterCounters(c.max_adapter_labels)

    # -- submission (any thread) ---------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises UnknownAdapter, QueueFull, Stopped or EngineError (bad prompt) at once."""
        if self._stop:
            raise Stopped("the server is shutting down; retry on another replica or later")
        if request.adapter is not None:
            entry = self.store.entry(request.adapter)
            if entry is None:
                self.stats["rejected"] += 1
                raise UnknownAdapter(f"adapter '{request.adapter}' does not exist; known: {', '.join(self.store.names()[:20]) or 'none'}")
            request.aid = entry.aid
        spec = None
        if request.merge is not None:
            try:
                spec = combos.normalise(self.store, *request.merge)
            except EngineError:
                self.stats["rejected"] += 1
                raise
        try:
            check_request(request, self.runner.vocab_size, self.max_prompt, self.max_new, self.config.max_len)
        except EngineError:
            self.stats["rejected"] += 1
            raise
        if spec is not None:  # outside the engine's lock: an eviction retires the evicted merge, which takes it
            try:
                request.aid = self.merges.acquire(spec)  # QueueFull when every new merge is in use
            except QueueFull:
                self.stats["rejected"] += 1
                raise
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.config.max_queue:
                self.stats["rejected"] += 1
                if spec is not None:
                    self.merges.release(request.aid)
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            request.label = self.counters.label(request)
            self.counters.add(request.label, requests=1)
            request.id = request.id or f"req-{next(self._ids)}"
            request.arrival = request.arrival or time.perf_counter()
            request.stream = TextStream(self.tokenizer, request.params.stop)
            request.generator = request.params.generator()
            self._inbox.append(request)
            self.stats["requests"] += 1
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (e.g. its client went away); its slot is freed at the next iteration."""
        request.cancelled = True
        self._wake.set()

    def generate(self, prompt: Sequence[int], adapter: Optional[str] = None, params: Optional[SamplingParams] = None) -> Request:
        """Submit one request and wait for it."""
        return self.drain([self.submit(Request(list(prompt), adapter, params or SamplingParams()))])[0]

    def drain(self, requests: Sequence[Request]) -> Sequence[Request]:
        """Wait until ``requests`` are done, stepping inline when the engine thread is not running."""
        for req in requests:
            while not req.done.is_set():
                if self._thread is None:
                    self.step() or self._wait_for_loads(0.05)
                else:
                    req.done.wait(0.1)
        return requests

    def add_adapter(self, name: str, path, check: bool = True):
        """Serve the adapter directory ``path`` as ``name`` (replacing a previous one of that name)."""
        old = self.store.entry(name)
        entry = self.store.register(name, path, check=check)
        if old is not None:
            self._retire(old.aid)
        return entry

    def remove_adapter(self, name: str) -> bool:
        """Stop serving ``name``; requests already queued for it still finish."""
        entry = self.store.unregister(name)
        if entry is not None:
            self._retire(entry.aid)
        return entry is not None

    def _retire(self, aid: str) -> None:
        with self._lock:
            self._retired.append(aid)  # the pool belongs to the step loop: it drops them there
        self._wake.set()

    @property
    def queue_length(self) -> int:
        return len(self.waiting) + len(self._inbox)

    # -- the loop -----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.store.close()
        if self.parameter_hooks is not None:
            self.parameter_hooks.close()
        self.runner.close()  # the model is as it was given: no hooks, modes restored

    def _loop(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except Exception as e:  # a bug must not take the server down: fail what was in flight, go on
                log.error("engine step failed:\n%s", traceback.format_exc())
                for req in list(self.running):
                    self._finish(req, "error", error=f"internal error: {e}")
                continue
            if not busy:
                if self.waiting:
                    self._wait_for_loads(0.05)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()

    def _wait_for_loads(self, timeout: float) -> None:
        """Nothing can run until an adapter arrives from disk: wait for the prefetch thread (a load stall)."""
        start = time.perf_counter()
        with self.store.loaded:
            self.store.loaded.wait(timeout)
        if self.waiting:
            self.stats["load_stall_seconds"] += time.perf_counter() - start

    def step(self) -> bool:
        """One iteration: admit and prefill, then decode; returns whether any forward ran."""
        start = time.perf_counter()
        self._take_inbox()
        admitted = self._admit()
        ran = bool(admitted or self.running)
        if ran and getattr(self.runner, "packed", False):
            self._mixed(admitted)
        elif ran:
            if admitted:
                self._prefill(admitted)
            if self.running:
                self._decode()
        if ran:
            self.stats["step_seconds"] += time.perf_counter() - start
        return ran

    def _take_inbox(self) -> None:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            retired, self._retired = self._retired, []
        for aid in retired:
            if not any(r.aid == aid for r in self.waiting):
                self.pool.drop(aid)
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")

    def _admit(self) -> list[Request]:
        c = self.config
        ahead = [r.aid for r in itertools.islice(self.waiting, c.lookahead) if r.aid and r.aid not in self.pool]
        if c.prefetch and ahead:
            self.store.want(ahead)
        admitted: list[Request] = []
        width = 0  # padded: the longest admitted prompt; packed: their tokens
        packed = getattr(self.runner, "packed", False)
        for req in list(self.waiting):
            if len(self.running) + len(admitted) >= c.max_batch:
                break
            w = max(width, len(req.prompt))
            tokens = width + len(req.prompt) if packed else w * (len(admitted) + 1)  # padded: w per prompt
            if admitted and tokens > c.max_prefill_tokens:
                break
            if req.aid is not None and not self._make_resident(req):
                continue
            self.waiting.remove(req)
            admitted.append(req)
            width = tokens if packed else w
        return admitted

    def _make_resident(self, req: Request) -> bool:
        """Pin the request's adapter in the pool; False leaves it queued (still loading, or no room)."""
        aid = req.aid
        if not self.runner.needs_pool:  # a baseline runner that holds its adapters itself
            return True
        if aid in self.pool:
            self.stats["pool_hits"] += 1
            self.pool.acquire(aid)
            req.holds_adapter = True
            return True
        failure = self.store.failure(aid)
        if failure:
            self.waiting.remove(req)
            self._finish(req, "error", error=failure, status=400)
            return False
        packed = self.store.cached(aid)
        if packed is None:
            if self.config.prefetch:
                self.store.want([aid])
                return False
            start = time.perf_counter()
            try:
                packed = self.store.load(aid)
            except AdapterFitError as e:
                self.waiting.remove(req)
                self._finish(req, "error", error=str(e), status=400)
                return False
            finally:
                self.stats["sync_loads"] += 1
                self.stats["load_stall_seconds"] += time.perf_counter() - start
        if not self.pool.fits(packed):
            return False
        try:
            self.pool.activate(packed)
        except PoolFull as e:
            if not self.pool.in_use_bytes():  # it can never fit
                self.waiting.remove(req)
                self._finish(req, "error", error=str(e), status=400)
            return False
        self.stats["pool_misses"] += 1
        self.pool.acquire(aid)
        req.holds_adapter = True
        return True

    def _mixed(self, admitted: list[Request]) -> None:
        """One packed forward: a token for every running request and the prompts of the admitted ones."""
        reqs, start = list(self.running), len(self.running)
        self.running.extend(admitted)  # first, so that a failing forward fails them too
        scored = [i for i, r in enumerate(admitted) if r.params.prompt_logprobs is not None]
        lengths = [len(r.prompt) + len(r.output) - 1 for r in reqs]
        dec, pre = self.runner.step([r.output[-1] for r in reqs], lengths, [r.aid for r in reqs],
                                    [r.prompt for r in admitted], start, [r.aid for r in admitted], keep_hidden=scored)
        if reqs:
            self.stats["decode_steps"] += 1
            self._sample(reqs, dec)
        if admitted:
            self._prefilled(admitted, pre, scored)

    def _prefill(self, admitted: list[Request]) -> None:
        start = len(self.running)
        self.running.extend(admitted)  # first, so that a failing forward fails them too
        scored = [i for i, r in enumerate(admitted) if r.params.prompt_logprobs is not None]
        logits = self.runner.prefill([r.prompt for r in admitted], start, [r.aid for r in admitted], keep_hidden=scored)
        self._prefilled(admitted, logits, scored)

    def _decode(self) -> None:
        reqs = list(self.running)
        lengths = [len(r.prompt) + len(r.output) - 1 for r in reqs]
        logits = self.runner.decode([r.output[-1] for r in reqs], lengths, [r.aid for r in reqs])
        self.stats["decode_steps"] += 1
        self._sample(reqs, logits)

    def _finish(self, req: Request, reason: str, delta: str = "", error: Optional[str] = None, status: int = 500) -> None:
        if req in self.running:
            i = self.running.index(req)
            last = self.running.pop()
            if last is not req:
                self.runner.move(len(self.running), i, min(len(last.prompt) + len(last.output), self.config.max_len))
                self.running[i] = last
        if req.holds_adapter:
            req.holds_adapter = False
            self.pool.release(req.aid)
        if req.merge is not None and req.aid is not None:
            self.merges.release(req.aid)
        req.finish_reason, req.error, req.status = reason, error, status
        req.finished_at = time.perf_counter()
        key = {"error": "failed", "cancelled": "cancelled"}.get(reason, "finished")
        self.stats[key] += 1
        if req.on_update:
            req.on_update(req, delta)
        req.done.set()
