"""What every benchmark shares: timing statistics, interleaved step timing, peak memory measured in a child
process, the machine a number was taken on, the exact command, and atomic JSON files.

Import from a script in bench/ with ``sys.path.insert(0, str(Path(__file__).resolve().parent))``.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ENV_KEYS = ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


# -- timing ----------------------------------------------------------------------------------------------
def summary(times: list[float]) -> dict:
    """Median, p10 and p90 of ``times`` (seconds) in milliseconds."""
    t = np.asarray(times) * 1e3
    return dict(median=float(np.median(t)), p10=float(np.percentile(t, 10)), p90=float(np.percentile(t, 90)))


def ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided ``level`` t-interval (0 for one value); level 0.90 gives the
    one-sided 95% bound as mean - half-width."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


MARGIN = 0.01  # the non-inferiority margin of "matches": 1 point of accuracy


def bounds(diffs: list[float]) -> tuple[float, float]:
    """One-sided 95% lower and upper bounds of the mean of ``diffs`` (Student's t; needs two or more)."""
    from scipy import stats

    res = stats.ttest_1samp(diffs, 0.0)
    ci = res.confidence_interval(0.90)  # its ends are the one-sided 95% bounds
    return float(ci.low), float(ci.high)


def decide(diffs: list[float], kind: str) -> tuple[str, str]:
    """(the paired difference in words, the verdict) for a "beats" or "matches" claim."""
    if len(diffs) < 2:
        return f"{len(diffs)} paired seed(s): too few to judge", "not judged"
    low, high = bounds(diffs)
    floor = 0.0 if kind == "beats" else -MARGIN
    text = (f"paired difference {100 * np.mean(diffs):+.1f} points over {len(diffs)} seeds, one-sided 95% bounds "
            f"[{100 * low:+.1f}, {100 * high:+.1f}]")
    return text, "yes" if low > floor else "no" if high < floor else "inconclusive"


THRESHOLD = {"beats": "lower 95% bound of the paired difference > 0",
             "matches": f"lower 95% bound of the paired difference > -{100 * MARGIN:g} point"}


def ratio_ci(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% interval of median(a) / median(b)."""
    rng = np.random.default_rng(0)
    a, b = np.asarray(a), np.asarray(b)
    r = np.median(rng.choice(a, (draws, len(a))), 1) / np.median(rng.choice(b, (draws, len(b))), 1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, n: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (a, b, c, a, b, c, ...) after ``warmup`` rounds, so a
    change in the machine's load hits every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], n: int, warmup: int = 1) -> float:
    """Median seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    return float(np.median(interleaved({"fn": fn}, warmup, n)["fn"]))


# -- peak memory -----------------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _probe(setup: Callable, run: Callable, args: tuple, threads: int, conn) -> None:
    try:
        torch.set_num_threads(threads)
        state = setup(*args)
        gc.collect()
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        run(state)
        conn.send((status_kib("VmHWM") - before) * 1024)
    except BaseException as e:  # the parent must hear why, not hang on recv
        conn.send(e)
    finally:
        conn.close()


def peak_rss_rise(setup: Callable, run: Callable, *args) -> int:
    """Bytes the peak resident set size rises during ``run(setup(*args))`` over the RSS after ``setup``.

    Runs in a child forked from a clean forkserver (not from this process, whose thread pools and allocator
    state would leak in), so peaks of different probes never mix. ``setup`` and ``run`` must be module-level
    functions. Linux only (reads /proc/self/status and resets the peak through /proc/self/clear_refs).
    """
    ctx = mp.get_context("forkserver")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe, args=(setup, run, args, torch.get_num_threads(), child))
    proc.start()
    child.close()
    try:
        value = parent.recv()
    except EOFError:
        value = RuntimeError(f"memory probe died (exit code {proc.join() or proc.exitcode})")
    proc.join()
    if isinstance(value, BaseException):
        raise value
    return value


# -- where and how a number was taken --------------------------------------------------------------------
def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    """The facts a timing depends on: CPU, cores, threads, library versions and the load right now."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "absent"
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                omp=os.environ.get("OMP_NUM_THREADS", "unset"), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft_version, python=platform.python_version(),
                load=load_average())


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, with the environment variables that change its numbers."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ)
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "bench/?.py"
    args = sys.argv[1:] if argv is None else argv
    return " ".join(x for x in (env, "python", script, shlex.join(args)) if x)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a killed run leaves the old file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
