"""``lorakit serve``: an OpenAI-compatible server for a base model and a directory of PEFT adapters.

Hook into the main parser with ``lorakit.serve.cli.add_parser(subparsers)``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Optional

from ..compress.quantize import KINDS as QUANTIZE_KINDS

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (its arguments and ``func``) to an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="serve a base model and many PEFT adapters over the OpenAI API",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="zoo name (e.g. gemma-270m, llama-25m) or a local HF model directory")
    p.add_argument("--adapters", default=None,
                   help="directory holding one PEFT adapter directory per adapter; the folder name is the adapter's name")
    p.add_argument("--user-adapters", default=None, metavar="FILE",
                   help="JSON of user id -> adapter name (users.json of `lorakit per-user`): requests for the model "
                        "--per-user-model are served with their `user` field's adapter")
    p.add_argument("--per-user-model", default="per-user", help="model id of the per-user model (default: per-user)")
    p.add_argument("--unknown-user", default="error", metavar="error|base|ADAPTER",
                   help="what a user missing from --user-adapters gets: 404 (error), the base model, or an adapter")
    p.add_argument("--library", default=None, metavar="DIR",
                   help="also serve every entry of this adapter library under its name (each must be made for --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the base model's id in `model` (default: --model)")
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route (default: $LORAKIT_API_KEY; unset: no auth)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default)")
    p.add_argument("--lora-root", action="append", default=None, metavar="DIR",
                   help="directory adapters may be loaded from over HTTP (repeatable; default: --adapters)")
    p.add_argument("--max-prompt-bytes", type=int, default=None,
                   help="UTF-8 bytes of prompt text accepted (default: 16 per prompt token, at least 64 KiB)")
    p.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds SIGTERM waits for running requests before cancelling them")
    p.add_argument("--device", default="cpu", metavar="|".join(DEVICES),
                   help="where the model, adapter pool and KV cache live: cpu (default), cuda, cuda:N, mps, or auto "
                        "(CUDA, else MPS, else CPU); a device this machine lacks is refused, naming what it has")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="base model dtype (adapters compute in float32 and are added before one rounding, as PEFT does)")
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None, metavar="KIND",
                   help="serve over the base with its linear layers quantised (lorakit.compress.quantize_): "
                        f"{', '.join(QUANTIZE_KINDS)}; adapters stay in float")
    p.add_argument("--max-batch", type=int, default=32, help="running requests per step (KV slots)")
    p.add_argument("--max-model-len", type=int, default=1024, help="prompt plus generated tokens per request")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: max-model-len - 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens accepted (default: max-model-len - 1)")
    p.add_argument("--max-queue", type=int, default=1024, help="queued requests before 429")
    p.add_argument("--pool-mb", type=float, default=64, help="active adapter pool budget, MiB")
    p.add_argument("--host-cache-mb", type=float, default=4096, help="host cache of loaded adapters, MiB")
    p.add_argument("--no-prefetch", action="store_true", help="read adapter files inside the step loop")
    p.add_argument("--max-merged-adapters", type=int, default=64,
                   help="per-request merges (merged_adapters) kept buildable and cached (segmented LRU; docs/serving.md)")
    p.add_argument("--max-adapter-labels", type=int, default=256,
                   help="adapters with their own label in /metrics; later ones count under kind=\"other\"")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin files (unpickling can run code)")
    p.add_argument("--cascade", action="append", default=None, metavar="NAME=SPEC",
                   help="serve an early-exit cascade (a spec JSON from `lorakit search-ensemble`) as classifier NAME on "
                        "/v1/classifications (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="weights of zoo models built from a config")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)
    return p


def build_engine(model: str, adapters: Optional[str] = None, dtype: str = "float32", seed: int = 0,
                 allow_pickle: bool = False, quantize: Optional[str] = None, library: Optional[str] = None,
                 device: str = "cpu", **config):
    """An Engine for a zoo name or model directory on ``device`` (its linear layers quantised to ``quantize`` if
    given), with every adapter under ``adapters`` and every entry of ``library`` (checked against the base) registered."""
    from .. import zoo
    from ..compress.quantize import QuantizeConfig, check_available, quantize_
    from .devices import resolve
    from .engine import Engine, EngineConfig
    from .moe import parameter_shapes
    from .store import AdapterStore, linear_shapes

    where, torch_dtype = resolve(device, dtype)  # an absent device is refused before the model loads
    quantization = QuantizeConfig(quantize, compute_dtype=torch_dtype) if quantize else None
    if quantization is not None:
        check_available(quantization)  # a kind this machine cannot run is refused before the model loads
    base, tokenizer = zoo.load(model, "causal_lm", dtype=torch_dtype, seed=seed)
    base.to(where)
    entries = {}
    if library:  # checked before quantisation changes the weights; another base is refused naming both fingerprints
        from ..library import Library

        lib = Library(library)
        entries = {name: lib.path_of(name, base=base) for name in lib.names()}
    if quantization is not None:
        quantize_(base, quantization)
    cfg = EngineConfig(**config)
    store = AdapterStore(linear_shapes(base), cfg.lora_dtype, cfg.host_bytes, cfg.prefetch, allow_pickle, device=where,
                         params=parameter_shapes(base))
    if adapters:
        store.scan(adapters)
    for name, path in entries.items():
        store.register(name, path)
    return Engine(base, tokenizer, cfg, store)


def load_cascades(items: list[str], device: str = "cpu") -> dict:
    """``NAME=SPEC`` options as name -> ``AdapterCascade``; a malformed option or spec is a user error."""
    from .cascade import AdapterCascade

    cascades = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--cascade {item!r}: expected NAME=SPEC.json")
        if not Path(spec).is_file():
            raise FileNotFoundError(f"--cascade {name}={spec}: no such file")
        cascades[name] = AdapterCascade.from_spec(spec, device)
        if cascades[name].window is None:
            raise ValueError(f"--cascade {name}={spec}: the spec has no calibrated window; calibrate it first")
    return cascades


def run(args: argparse.Namespace) -> int:
    """Build the engine, start its step loop and serve until SIGTERM or Ctrl-C, which drain it (exit 0)."""
    import uvicorn

    from .devices import resolve
    from .server import build_app

    where, _ = resolve(args.device, args.dtype)  # an absent device: one line, exit 2, before anything loads
    if args.adapters and not Path(args.adapters).is_dir():
        raise FileNotFoundError(f"--adapters {args.adapters}: no such directory")
    roots = args.lora_root or ([args.adapters] if args.adapters else [])
    for r in roots:
        if not Path(r).is_dir():
            raise FileNotFoundError(f"--lora-root {r}: no such directory")
    if args.allow_runtime_lora and not roots:
        raise ValueError("--allow-runtime-lora needs --lora-root DIR (or --adapters DIR): where adapters may be loaded from")
    cascades = load_cascades(args.cascade or [], where)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = build_engine(
        args.model, args.adapters, args.dtype, args.seed, args.allow_pickle, args.quantize, args.library, args.device,
        max_batch=args.max_batch, max_len=args.max_model_len, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, max_queue=args.max_queue, pool_bytes=int(args.pool_mb * 2**20),
        host_bytes=int(args.host_cache_mb * 2**20), prefetch=not args.no_prefetch,
        max_merged=args.max_merged_adapters, max_adapter_labels=args.max_adapter_labels,
    )
    name = args.served_model_name or args.model
    logging.getLogger("lorakit.serve").info("serving %s (%s, %s%s) with %d adapters on http://%s:%d/v1", name,
                                            engine.device, args.dtype, f", {args.quantize}" if args.quantize else "",
                                            len(engine.store.names()), args.host, args.port)
    users = None
    if args.user_adapters:
        from .users import UserAdapters

        users = UserAdapters.load(args.user_adapters, engine.store.names(), args.per_user_model, args.unknown_user)
    app = build_app(engine, name, args.api_key, args.allow_runtime_lora, roots, args.max_prompt_bytes, users=users,
                    classifiers=cascades)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again with the handlers it found installed:
    # these record it instead of killing the process, so the engine stops cleanly and the exit status is 0
    stopped = []
    previous = {sig: signal.signal(sig, lambda s, _: stopped.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        logging.getLogger("lorakit.serve").info("drained and stopped on signal %d", stopped[0])
    return 0
