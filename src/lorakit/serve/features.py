"""What the step loop does with a forward's logits, request by request: the request features.

``RequestFeatures`` is the engine's half that knows them (the engine, ``engine.py``, schedules, admits and runs
forwards): after a prefill, the prompt's log-probabilities (echo with logprobs, ``logprobs.prompt_records``); for
every row, rows with NaN or infinite logits failed alone (their KV rows wiped), ``logit_bias``, structured-output
masks (``guided``), the draw (``sampling.next_tokens``: greedy, temperature, top-k, top-p, per-request seeds), the
chosen and likely tokens' log-probabilities (``logprobs.pick``), per-adapter counters, and the stop conditions
(EOS, stop strings through the text stream, a finished JSON document, ``max_tokens``, the context).
"""
from __future__ import annotations

import time

import torch

from .guided import GuideError, apply_guides
from .logprobs import pick, prompt_records
from .request import Request
from .sampling import add_bias, next_tokens, unusable_rows


class RequestFeatures:
    """The per-request half of the step loop (mixed into ``Engine``; uses its runner, counters, stats and
    ``_finish``)."""

    def _prefilled(self, admitted: list[Request], logits: torch.Tensor, scored: list[int]) -> None:
        self.stats["prefill_steps"] += 1
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in admitted)
        for r in admitted:
            self.counters.add(r.label, prompt=len(r.prompt))
        failed = []
        for i in scored:
            req = admitted[i]
            try:
                req.prompt_logprobs = prompt_records(lambda lo, hi: self.runner.prompt_logits(i, lo, hi, logits[i]),
                                                     req.prompt, req.params.prompt_logprobs)
            except RuntimeError as e:
                failed.append(i)
                self._finish(req, "error", error=str(e), status=400)
        self.runner.hidden = {}
        if failed:
            keep = [i for i in range(len(admitted)) if i not in failed]
            admitted, logits = [admitted[i] for i in keep], logits[keep]
        if admitted:
            self._sample(admitted, logits)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        logits = logits.cpu()  # sampling, logit_bias and grammars run on the host (the same draws on every device)
        bad, reqs = unusable_rows(logits), list(reqs)
        if bad:  # e.g. an adapter with huge weights: fail those requests alone, and wipe their KV rows
            for i in bad:
                self.runner.clear(self.running.index(reqs[i]))
            message = "the model produced NaN or infinite logits{}; the adapter's weights are unusable (too large?)"
            for i in reversed(bad):
                req = reqs.pop(i)
                self._finish(req, "error", error=message.format(f" with adapter '{req.adapter}'" if req.adapter else ""),
                             status=400 if req.adapter else 500)
            logits = logits[[i for i in range(logits.shape[0]) if i not in set(bad)]]
            if not reqs:
                return
        params = [r.params for r in reqs]
        scores = add_bias(logits, params)
        scores, stuck = apply_guides(scores, [r.guide for r in reqs], copy=scores is logits)
        if stuck:  # nothing the grammar allows is left (cannot happen with a sound grammar)
            for i in reversed(stuck):
                self._finish(reqs.pop(i), "error", error="response_format: the grammar allows no token here", status=400)
            keep = [i for i in range(len(params)) if i not in set(stuck)]
            logits, scores, params = logits[keep], scores[keep], [params[i] for i in keep]
            if not reqs:
                return
        tokens = next_tokens(scores, params, [r.generator for r in reqs])
        now = time.perf_counter()
        self.stats["generated_tokens"] += len(tokens)
        self.token_log.append((now, len(tokens)))
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            if req.params.logprobs is not None:
                req.logprobs += pick(logits[i:i + 1], [tok], req.params.logprobs)
            self.counters.add(req.label, generated=1)
            self._append(req, tok, now)

    def _append(self, req: Request, token: int, now: float) -> None:
        req.output.append(token)
        req.token_times.append(now)
        if req.first_token_at is None:
            req.first_token_at = now
        delta, stopped = req.stream.push(token)
        p = req.params
        reason = None
        complete = False  # the structured output's document is finished
        if req.guide is not None:
            try:
                complete = req.guide.advance(token)
            except GuideError as e:
                self._finish(req, "error", error=str(e), status=500)
                return
        if token in self.eos and not p.ignore_eos or stopped or complete:
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.config.max_len:
            reason = "length"
        if reason and not stopped:
            delta += req.stream.flush()
        req.text += delta
        if reason:
            self._finish(req, reason, delta)
        elif delta and req.on_update:
            req.on_update(req, delta)

