"""Load generator for the load test, run as its own process (as real clients are): CLIENTS concurrent clients
send completions for adapters ``ad0000 ... ad{N-1}`` in turn (every third one streamed) until all N were asked
for or MAX_SECONDS passed; prints a JSON summary."""

import asyncio
import json
import sys
import time

import httpx


async def main(url: str, n: int, clients: int, max_seconds: float) -> dict:
    counter = iter(range(n))
    results = {"ok": 0, "failures": [], "served": 0}
    deadline = time.time() + max_seconds

    async def client(h: httpx.AsyncClient, k: int) -> None:
        while time.time() < deadline and (i := next(counter, None)) is not None:
            stream = i % 3 == 0
            body = {"model": f"ad{i:04d}", "prompt": f"request {i}", "max_tokens": 2, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            try:
                r = await h.post("/v1/completions", json=body)
                good = r.status_code == 200 and ("data: [DONE]" in r.text if stream else r.json()["usage"]["completion_tokens"] == 2)
            except Exception as e:  # a dropped connection is a failure too
                good, r = False, e
            if good:
                results["ok"] += 1
            else:
                what = f"{r.status_code}: {r.text[:200]}" if isinstance(r, httpx.Response) else repr(r)[:200]
                results["failures"].append(f"request {i} ({'streamed' if stream else 'whole'}): {what}")
            results["served"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as h:
        await asyncio.gather(*(client(h, k) for k in range(clients)))
    return results


if __name__ == "__main__":
    url, n, clients, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    start = time.time()
    summary = asyncio.run(main(url, n, clients, seconds))
    summary["seconds"] = time.time() - start
    print(json.dumps(summary))
