"""A Hugging Face causal LM run for many requests at once, with each request's adapter injected per token.

The base weights' values are never modified, and ``close`` leaves the model as it came (LoRA forwards and hooks
removed, the weights' layout and each module's train/eval mode restored): every adapted layer adds the batched
LoRA update (``ops.lora_add_``) for the tokens whose request has an adapter, reading the active pool's tables,
inside its own call for a plain ``nn.Linear`` and through a forward hook otherwise (``layers.py``, which also
stores float32 CPU weights transposed while serving). One base GEMM serves all requests. Attention runs on
``SlotKVCache``.

Two ways to run a step. Packed (``step``, the default where it is exact): the step's decode tokens and new prompts
as one unpadded sequence, with explicit positions, the cache's ``lorakit_slots`` attention reading each request's
own slot, and the LM head applied to the last token of each prompt and to every decode token only (``logits_to_keep``
as indices). Whether a model packs is checked once, at start-up, by running two short prompts both ways and
comparing the logits: a model whose attention does not go through transformers' attention interface, or does more
than plain softmax attention (sliding windows, Gemma 3; soft-capping), and LLM.int8 bases (below), use the padded
path: prefill takes left-padded prompts (the last column is every row's last prompt token, so only it reaches
the LM head), decode one token per running slot, with explicit masks (one per layer type for models whose layers
mix full and sliding-window attention).

Prompt log-probabilities (echo with logprobs) need the logits at every prompt position, which the LM head is not
asked for (a [tokens, vocabulary] tensor can be gigabytes): a hook keeps the final hidden states of the rows that
want them, and ``prompt_logits`` applies the LM head (and Gemma's final soft-capping) to a few positions at a time,
after checking that this reproduces the model's own logits at the last position.

Quantised bases (``lorakit.compress.quantize_``) serve as they are: every kind but one computes each token's row
on its own. LLM.int8 (bitsandbytes ``Linear8bitLt`` with an outlier threshold) picks its float16 outlier columns
over the whole step, so a request's output would depend on the other requests (and on padding); when a step has
an activation at or above the threshold, such a layer is run again one request at a time over its real tokens,
which is what that request alone computes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..core.adapter import quantized_kind
from .devices import model_device
from .kvcache import ATTENTION, PackedStep, SlotKVCache
from .layers import ServingLayers, transposes
from .ops import StepPlan, lora_add_, plan_split, plan_step
from .pool import AdapterPool
from .store import linear_shapes


class ModelRunner:
    """Prefill and decode forwards over slots, with per-request adapters from ``pool``."""

    needs_pool = True  # the engine makes each request's adapter resident in the pool before admitting it
    packs = True  # may run packed steps (a runner whose forward needs one row per request sets False)
    serving_layout = True  # float32 CPU weights stored transposed while serving (``layers.py``); baselines keep theirs

    def __init__(self, model: nn.Module, pool: AdapterPool, max_slots: int, max_len: int, backend: str = "auto"):
        self._modes = {m: m.training for m in model.modules()}  # restored by close()
        self.model = model.eval()
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = embed.num_embeddings if embed is not None else model.config.vocab_size  # ids must be below
        self.pool, self.backend = pool, backend
        self.config = model.config
        self.shapes = linear_shapes(model)
        self.modules = dict(model.named_modules())
        layers = getattr(self.config, "num_hidden_layers", None) or self.config.n_layer
        self.cache = SlotKVCache(layers, max_slots, max_len)
        self._plan: Optional[StepPlan] = None
        self._tables: dict = {}
        types = set(getattr(self.config, "layer_types", None) or [])
        self.window = getattr(self.config, "sliding_window", None) if "sliding_attention" in types else None
        self.layer_types = types if self.window else None
        self.eager = self.config._attn_implementation == "eager"
        self.dtype = next(model.parameters()).dtype
        self.device = model_device(model)  # every tensor a step builds goes here
        self.layers = ServingLayers(model, self.serving_layout and transposes(self.device, self.dtype))
        self._real: Optional[torch.Tensor] = None  # [n, width] real (non-padding) tokens of a prefill step
        self._decode_rows = 0  # decode tokens at the head of a packed step
        self._stepping = False
        self.hidden: dict[int, torch.Tensor] = {}  # prefill row -> final hidden states of its prompt [len, hidden]
        self.rowwise_calls = 0  # LLM.int8 layer calls rerun per request (outliers in a batched step)
        self._rowwise = [m.register_forward_hook(self._per_request) for m in self.modules.values()
                         if quantized_kind(m) is not None and getattr(getattr(m, "state", None), "threshold", 0) > 0]
        self.packed = False
        self.packed = self.packs and not self._rowwise and self.window is None and self._packs_exactly()

    def _packs_exactly(self) -> bool:
        """Two prompts prefilled and decoded padded, then packed (a decode and a prefill in one step): same logits?"""
        p0, p1 = [1, 5, 6, 7], [1, 9]
        try:
            padded = self.prefill([p0, p1], 0, [None, None])
            padded_dec = self.decode([3, 4], [len(p0), len(p1)], [None, None])
            self.packed = True
            first = self.step([], [], [], [p0], 0, [None])[1]
            dec0, pre1 = self.step([3], [len(p0)], [None], [p1], 1, [None])
            dec1 = self.step([5, 4], [len(p0) + 1, len(p1)], [None, None], [], 2, [])[0][1:]
            got, want = torch.cat([first, pre1, dec0, dec1]), torch.cat([padded, padded_dec])
            tol = 1e-4 if self.dtype == torch.float32 else 2e-2
            return bool(torch.allclose(got, want, atol=tol, rtol=tol))
        except Exception:  # noqa: BLE001 - any model the packed attention does not fit runs padded
            return False
        finally:
            self.packed = False
            for slot in (0, 1):
                self.clear(slot)

    def _per_request(self, module, args, output):
        """LLM.int8's outlier columns span the step: with outliers in it, each request's rows again on their own."""
        x = args[0]
        if not self._stepping or x.dim() != 3 or x.shape[0] * x.shape[1] == 1:
            return None
        if not (x.half().abs() >= module.state.threshold).any():  # bitsandbytes tests the float16 cast, as here
            return None
        self.rowwise_calls += 1
        output = output.clone()
        for b in range(x.shape[0]):
            real = slice(None) if self._real is None else self._real[b]
            output[b, real] = module.forward(x[b:b + 1, real])[0]  # .forward: no hooks, so no recursion
        return output

    # -- adapter injection --------------------------------------------------------------------------
    def ensure_hooks(self, paths) -> None:
        """Put the LoRA term into the layers at ``paths`` (inside the call of a plain Linear, else a hook)."""
        for path in paths:
            if path not in self.layers.installed:
                self.layers.install(path, self._hook(path))

    def _hook(self, path: str):
        def add_lora(module, args, output):
            tables = self._tables.get(path)
            if tables:
                x = args[0]
                lora_add_(output.view(-1, output.shape[-1]), x.reshape(-1, x.shape[-1]), self._plan, tables, self.backend)

        return add_lora

    def _set_adapters(self, rows: Sequence[Optional[str]], real: Optional[torch.Tensor] = None) -> None:
        """Build the step's plan from each row's adapter id (None: the base model); ``real`` [n, width] marks
        the tokens that are not padding (all of them in a decode step)."""
        if all(a is None for a in rows):
            self._plan, self._tables = None, {}
            return
        keys, index, cls_row, slot_row = [], {}, [], []
        for aid in rows:
            cls, slot = (None, 0) if aid is None else self.pool.slot_of(aid)
            if cls is not None and cls.key not in index:
                index[cls.key] = len(keys)
                keys.append(cls.key)
            cls_row.append(-1 if cls is None else index[cls.key])
            slot_row.append(slot)
        if real is not None and real.dim() == 1:  # a packed step: row b holds real[b] consecutive tokens
            token_cls = torch.tensor(cls_row, device=self.device).repeat_interleave(real)
            token_slot = torch.tensor(slot_row, device=self.device).repeat_interleave(real)
        else:
            width = 1 if real is None else real.shape[1]
            token_cls = torch.tensor(cls_row, device=self.device)[:, None].expand(-1, width)
            if real is not None:
                token_cls = token_cls.masked_fill(~real, -1)  # padding takes no adapter
            token_slot = torch.tensor(slot_row, device=self.device)[:, None].expand(-1, width)
        if real is not None and real.dim() == 1:  # the decode tokens (first) and the prompts planned apart
            self._plan = plan_split(token_cls, token_slot, keys, self._decode_rows)
        else:
            self._plan = plan_step(token_cls.reshape(-1), token_slot.reshape(-1), keys)
        paths = {p for k in keys for p, *_ in k}
        self.ensure_hooks(paths)
        self._tables = {p: self.pool.tables_for(p) for p in paths}

    # -- masks --------------------------------------------------------------------------------------
    def _masks(self, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """``allowed`` [n, 1, q, k] (causal and padding) -> the model's mask argument (a dict per layer type)."""
        def finish(m):
            if not self.eager:
                return m
            return torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, torch.finfo(self.dtype).min)

        if self.layer_types is None:
            return finish(allowed)
        sliding = allowed & (k_pos > q_pos - self.window)
        return {t: finish(sliding if t == "sliding_attention" else allowed) for t in self.layer_types}

    # -- forwards -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], start: int, adapters: Sequence[Optional[str]],
                keep_hidden: Sequence[int] = ()) -> torch.Tensor:
        """Run prompts into slots ``start...``; returns the logits after each prompt's last token [n, vocab]; the
        rows ``keep_hidden`` keep their final hidden states in ``self.hidden`` (for ``prompt_logits``)."""
        if self.packed:
            return self.step([], [], [], prompts, start, adapters, keep_hidden)[1]
        n, width = len(prompts), max(len(p) for p in prompts)
        offsets = [width - len(p) for p in prompts]
        ids = torch.zeros(n, width, dtype=torch.long, device="cpu")  # built on the host, then moved in one copy
        for b, p in enumerate(prompts):
            ids[b, offsets[b]:] = torch.tensor(p, dtype=torch.long, device="cpu")
        ids = ids.to(self.device)
        off = torch.tensor(offsets, device=self.device)[:, None]
        cols = torch.arange(width, device=self.device)[None, :]
        positions = (cols - off).clamp(min=0)
        q = cols[:, :, None]
        k = cols[:, None, :]
        real_k = k >= off[:, :, None]
        allowed = ((k <= q) & real_k) | (k == q)  # pad queries see themselves only (no empty rows)
        masks = self._masks(allowed[:, None], q[:, None], k[:, None])
        self._real = real_k[:, 0, :]
        self._set_adapters(adapters, self._real)
        self.cache.prefill(start, offsets, [len(p) for p in prompts])
        kept: list[torch.Tensor] = []
        hook = None
        if keep_hidden:  # the decoder's output: final hidden states (normalised) of every position
            hook = self.model.base_model.register_forward_hook(lambda m, a, out: kept.append(out[0]))
        try:
            out = self._forward(input_ids=ids, position_ids=positions, attention_mask=masks, past_key_values=self.cache,
                                use_cache=True, logits_to_keep=1)
        finally:
            if hook is not None:
                hook.remove()
        self.hidden = {b: kept[0][b, offsets[b]:] for b in keep_hidden}
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prompt_logits(self, row: int, lo: int, hi: int, last: torch.Tensor) -> torch.Tensor:
        """Logits after prompt positions ``[lo, hi)`` of prefill row ``row`` [hi - lo, vocab]; ``last`` (the logits
        the model gave after the prompt) checks that the LM head here is the model's."""
        hidden = self.hidden[row]
        head = self.model.get_output_embeddings()
        cap = getattr(self.config, "final_logit_softcapping", None)

        def logits(h: torch.Tensor) -> torch.Tensor:
            out = head(h).float()
            return out if not cap else torch.tanh(out / cap) * cap

        if lo == 0 and not torch.allclose(logits(hidden[-1:])[0], last, atol=1e-4, rtol=1e-4):
            raise RuntimeError("prompt logprobs are not available for this model: its logits are not its LM head "
                               "applied to its final hidden states")
        return logits(hidden[lo:hi])

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], lengths: Sequence[int], adapters: Sequence[Optional[str]]) -> torch.Tensor:
        """One token for each of slots ``[0, n)``, at positions ``lengths``; returns next-token logits [n, vocab]."""
        if self.packed:
            return self.step(tokens, lengths, adapters, [], len(tokens), [])[0]
        lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        width = int(lens.max()) + 1
        k = torch.arange(width, device=self.device)[None, None, None, :]
        q = lens[:, None, None, None]
        masks = self._masks(k <= q, q, k)
        self._real = None
        self._set_adapters(adapters)
        self.cache.decode(lens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        out = self._forward(input_ids=ids, position_ids=lens[:, None], attention_mask=masks, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], lengths: Sequence[int], adapters: Sequence[Optional[str]],
             prompts: Sequence[Sequence[int]], start: int, prompt_adapters: Sequence[Optional[str]],
             keep_hidden: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed forward: a token for each of slots ``[0, len(tokens))`` at positions ``lengths``, and
        ``prompts`` into slots ``start...``; returns (next-token logits of the decode rows, of the prompts)."""
        n, sizes = len(tokens), [len(p) for p in prompts]
        device = self.cache.device or self.device
        plan = PackedStep.build(list(lengths), start, sizes, device)
        ids = torch.tensor([*tokens, *(t for p in prompts for t in p)], dtype=torch.long, device=device)[None]
        counts = torch.tensor([1] * n + sizes, dtype=torch.long, device=device)
        ends = torch.cumsum(counts, 0)
        self._real, self._decode_rows = None, n
        self._set_adapters([*adapters, *prompt_adapters], counts)
        self.cache.packed(plan)
        kept: list[torch.Tensor] = []
        hook = None
        if keep_hidden:
            hook = self.model.base_model.register_forward_hook(lambda m, a, out: kept.append(out[0]))
        attn = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION
        try:
            out = self._forward(input_ids=ids, position_ids=plan.positions[None], past_key_values=self.cache,
                                use_cache=True, logits_to_keep=(ends - 1).to(device), lorakit_step=(self.cache, plan))
        finally:
            self.config._attn_implementation = attn
            if hook is not None:
                hook.remove()
        self.hidden = {b: kept[0][0, int(ends[n + b] - sizes[b]):int(ends[n + b])] for b in keep_hidden}
        logits = out.logits[0].float()
        return logits[:n], logits[n:]

    def _forward(self, **inputs):
        self._stepping = True  # the per-request hooks act on the runner's steps only, not on other calls of the model
        try:
            return self.model(**inputs)
        finally:
            self._stepping = False

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        """Zero a slot's cache (it may hold NaN, which masked attention would still multiply by 0)."""
        self.cache.clear(slot)

    def close(self) -> None:
        """Remove forwards and hooks, restore the weight layout and every module's train/eval mode: the model is as
        it was given."""
        self.layers.close()
        for h in self._rowwise:
            h.remove()
        self._rowwise.clear()
        self._plan, self._tables = None, {}
        for m, training in self._modes.items():
            m.training = training
