"""vLLM as a system of the serving benchmark: run with vLLM's own Python (its CPU build needs a venv of its own).

    VLLM_PYTHON bench/serve_vllm.py --model DIR [--adapters DIR --lora] [--slots 32 --max-len 256 --threads 1]

Builds an in-process ``LLMEngine`` (no engine-core subprocess, so the process's CPU time is all of vLLM's work),
prints one JSON line with its start-up time, then answers commands, one JSON line each, read from stdin:

- ``{"op": "replay", "trace": PATH, "adapters": true}``: replays the trace's JSONL open loop (each request added
  at its timestamp, the engine stepped in between, EOS ignored, greedy), with each request's adapter as a
  ``LoRARequest`` (``"adapters": false``: the base model); answers throughput per wall- and CPU-second, TTFT and
  every request's tokens;
- ``{"op": "first", "adapter": NAME}``: the seconds from adding a one-token request for an adapter the engine has
  never seen to its answer (the adapter is read from disk then);
- ``{"op": "quit"}``.

Prompts go in as token ids and outputs come back as ids (``skip_tokenizer_init``), so no tokenizer is involved.
LoRA settings: ``max_loras`` is one more than the batch (in vLLM 0.32's CPU LoRA ops the no-LoRA index -1 selects
the last slot, so a full set of slots would give base rows the last adapter's update), ``max_cpu_loras`` holds
every adapter of the trace (as lorakit's host cache does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def say(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", default=None, help="folder of PEFT adapter directories (one per name)")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--cpu-loras", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from vllm import EngineArgs, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.llm_engine import LLMEngine

    kw = dict(model=args.model, skip_tokenizer_init=True, dtype="float32", seed=0, max_num_seqs=args.slots,
              max_model_len=args.max_len, max_num_batched_tokens=max(2048, args.max_len))
    if args.lora:
        kw.update(enable_lora=True, max_loras=args.slots + 1, max_lora_rank=args.max_rank, max_cpu_loras=args.cpu_loras)
    engine = LLMEngine.from_engine_args(EngineArgs(**kw))
    say(dict(ready=True, startup_s=time.perf_counter() - start, startup_cpu_s=time.process_time(),  # the whole process so far
             threads=torch.get_num_threads(), version=__import__("vllm").__version__))
    ids: dict[str, int] = {}

    def lora(name):
        if name is None or not args.lora:
            return None
        ids.setdefault(name, len(ids) + 1)
        return LoRARequest(name, ids[name], os.path.join(args.adapters, name))

    def params(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "first":
            t = time.perf_counter()
            engine.add_request("first-" + cmd["adapter"], {"prompt_token_ids": [1, 5, 6, 7]}, params(1),
                               lora_request=lora(cmd["adapter"]))
            while engine.has_unfinished_requests():
                engine.step()
            say(dict(first_s=time.perf_counter() - t))
            continue
        with open(cmd["trace"]) as f:
            trace = [json.loads(x) for x in f if x.strip()]
        use = cmd.get("adapters", True)
        first, done, outputs = {}, {}, {}
        t0, cpu0 = time.perf_counter() + 0.05, time.process_time()
        i, tag = 0, f"r{time.monotonic_ns()}-"
        while i < len(trace) or engine.has_unfinished_requests():
            now = time.perf_counter()
            while i < len(trace) and t0 + trace[i]["t"] <= now:
                item = trace[i]
                engine.add_request(tag + str(i), {"prompt_token_ids": item["prompt"]}, params(item["max_tokens"]),
                                   lora_request=lora(item["adapter"] if use else None))
                i += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, min(0.01, t0 + trace[i]["t"] - time.perf_counter())))
                continue
            for out in engine.step():
                k = int(out.request_id[len(tag):])
                toks = out.outputs[0].token_ids
                if toks and k not in first:
                    first[k] = time.perf_counter()
                if out.finished:
                    done[k], outputs[k] = time.perf_counter(), list(toks)
        cpu_s = time.process_time() - cpu0
        span = max(done.values()) - t0
        tokens = sum(len(o) for o in outputs.values())
        ttft = sorted(first[k] - (t0 + trace[k]["t"]) for k in first)
        say(dict(seconds=span, cpu_seconds=cpu_s, output_tokens=tokens, tok_s=tokens / span, tok_cpu_s=tokens / cpu_s,
                 completed=len(done), requests=len(trace), req_s=len(done) / span,
                 ttft_p50=ttft[len(ttft) // 2], ttft_p99=ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                 outputs=[" ".join(map(str, outputs[k])) for k in range(len(trace))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
