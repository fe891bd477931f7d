"""`lorakit serve` as a user runs it: a process serving a zoo model and an adapter directory on loopback."""

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from lorakit.serve.cli import add_parser

from serve_helpers import make_adapter
from test_serve_http import free_port

LAUNCH = ("import argparse, sys; from lorakit.serve.cli import add_parser; p = argparse.ArgumentParser(); "
          "add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_parser_defaults_and_flags():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "tiny-llama", "--adapters", "d", "--port", "9", "--pool-mb", "2"])
    assert (args.model, args.adapters, args.host, args.port, args.pool_mb) == ("tiny-llama", "d", "127.0.0.1", 9, 2.0)
    assert args.func.__name__ == "run"


# a fresh interpreter importing torch and transformers: 20-60 s on a busy machine
def test_serve_process_answers_over_loopback(tmp_path):
    make_adapter(tmp_path / "adapters" / "mine", "tiny-llama", r=8)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAKIT_API_KEY": "k"}
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--model", "tiny-llama", "--adapters", str(tmp_path / "adapters"),
           "--port", str(port), "--max-model-len", "128", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up: " + proc.stdout.read1().decode(errors="replace"))
        auth = {"Authorization": "Bearer k"}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=auth).json()["data"]] == ["tiny-llama", "mine"]
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                       json={"model": "mine", "prompt": "hi", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
