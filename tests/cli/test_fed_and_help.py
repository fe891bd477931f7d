"""``fed run`` checks its settings before an engine starts, shows progress and keeps the final adapter; every
option's default is in ``--help``; ``python -m lorakit`` is the command."""
from __future__ import annotations

import argparse
import json

import pytest

import lorakit
from lorakit.cli import DefaultsFormatter, build_parser, main
from lorakit.federated import local, runner
from lorakit.federated.experiment import Experiment, Settings

from trust_helpers import one_line_error, snapshot

TOY = ["--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "2", "--local-steps", "1",
       "--rank", "2", "--max-train", "60", "--max-eval", "30"]


@pytest.fixture
def no_engine(monkeypatch):
    """Every engine fails the test if it starts."""
    def started(*args, **kwargs):
        raise AssertionError("an engine was started")

    for module, name in ((runner, "simulate"), (runner, "deploy"), (local, "run_in_process")):
        monkeypatch.setattr(module, name, started)


@pytest.mark.parametrize("engine", ["simulation", "deployment", "inprocess"])
def test_fed_run_with_an_unknown_model_fails_before_any_engine_starts(tmp_path, capsys, no_engine, engine):
    assert main(["fed", "run", "--engine", engine, "--model", "no-such-model", "-o", str(tmp_path / "fed")]) == 2
    one_line_error(capsys, "unknown model 'no-such-model'", "minilm")
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize("error", [RuntimeError("the SuperLink did not start"), TimeoutError("no result in 60 s")])
def test_an_engine_failure_is_one_line_through_the_main_command(tmp_path, capsys, monkeypatch, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner, "deploy", failing)
    assert main(["fed", "run", *TOY[2:], "--engine", "deployment", "-o", str(tmp_path / "fed")]) == 2
    one_line_error(capsys, str(error))


def test_fed_run_refuses_an_existing_output(tmp_path, capsys, no_engine):
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "history.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(["fed", "run", *TOY, "-o", str(tmp_path / "fed")]) == 2
    one_line_error(capsys, "already exists", "--overwrite")
    assert main(["fed", "app", str(tmp_path / "fed")]) == 2
    one_line_error(capsys, "already exists")
    assert snapshot(tmp_path) == before


def test_fed_run_shows_each_round_and_keeps_the_final_global_adapter(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("lorakit.federated.cli.print_round", lambda record: seen.append(record["round"]))
    out = tmp_path / "fed"
    assert main(["fed", "run", *TOY, "-o", str(out)]) == 0
    assert seen == [0, 1, 2]  # one call per round as it ends
    assert f"adapter: {(out / 'adapter').resolve()}" in capsys.readouterr().out
    settings = Settings(**{k.replace("-", "_"): v for k, v in json.loads((out / "history.json").read_text())["settings"].items()})
    exp = Experiment(settings)
    model = lorakit.load_peft(exp.base_model(), out / "adapter")
    assert abs(exp.evaluate(model)["accuracy"] - json.loads((out / "history.json").read_text())["rounds"][-1]["accuracy"]) < 1e-9
    # a rerun refuses the directory; --resume with the same settings finds every round done
    assert main(["fed", "run", *TOY, "-o", str(out)]) == 2
    one_line_error(capsys, "already exists")
    assert main(["fed", "run", *TOY[:-2], "--max-eval", "20", "--resume", "-o", str(out)]) == 2
    one_line_error(capsys, "--max-eval 30", "20")
    assert main(["fed", "run", *TOY, "--resume", "-o", str(out)]) == 0


def test_the_flower_runner_reports_rounds_as_the_server_writes_them(tmp_path):
    history, got = tmp_path / "history.json", []
    assert runner._new_rounds(history, 0, got.append) == 0  # not written yet
    history.write_text(json.dumps({"rounds": [{"round": 0}]}))
    seen = runner._new_rounds(history, 0, got.append)
    history.write_text(json.dumps({"rounds": [{"round": 0}, {"round": 1}, {"round": 2}]}))
    runner._new_rounds(history, seen, got.append)
    assert [r["round"] for r in got] == [0, 1, 2]


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_shows_every_options_default():
    checked = 0
    for parser in _parsers(build_parser()):
        assert issubclass(parser.formatter_class, DefaultsFormatter), parser.prog
        for action in parser._actions:
            if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
                continue
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            assert "(default" in formatter.format_help(), (parser.prog, action.dest)  # the line --help prints
            checked += 1
    assert checked > 80  # train, eval, info, merge, fed run/app, serve, demo


@pytest.mark.parametrize("command", ["merge", "fed run", "serve"])
def test_help_of_the_package_commands(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"usage: lorakit {command}" in out and "(default:" in out

