"""`lorakit serve`'s arguments."""

import argparse

from lorakit.serve.cli import add_parser


def test_parser_defaults_and_flags():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "tiny-llama", "--adapters", "d", "--port", "9", "--pool-mb", "2"])
    assert (args.model, args.adapters, args.host, args.port, args.pool_mb) == ("tiny-llama", "d", "127.0.0.1", 9, 2.0)
    assert args.func.__name__ == "run" and not args.allow_runtime_lora and args.lora_root is None  # off by default


def test_runtime_loading_needs_a_root(capsys):
    from lorakit.cli import main

    assert main(["serve", "--model", "tiny-llama", "--allow-runtime-lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora-root" in err


# `lorakit serve` as a process (startup, loopback, SIGTERM) is exercised by test_serve_probe.py
