"""``lorakit merge`` as ``lorakit.merging.cli_main(argv)``: merges directories; user errors are one line, status 2."""
from __future__ import annotations

import pytest
from merge_helpers import assert_close, toy_state

import lorakit
from lorakit.merging import cli_main, combine


@pytest.fixture
def dirs(tmp_path):
    states = [toy_state(1), toy_state(2, r=8, targets=["lin1"]), toy_state(3, r=2)]
    return states, [str(lorakit.save_state(s, tmp_path / f"in{i}")) for i, s in enumerate(states)]


def test_merges_directories_like_combine(dirs, tmp_path, capsys):
    states, paths = dirs
    out = tmp_path / "out"
    assert cli_main([*paths, "--method", "lego", "--rank", "3", "--weights", "0.5,0.3", "0.2", "--seed", "4", "-o", str(out)]) == 0
    assert "merged 3 adapters with lego" in capsys.readouterr().out
    expected = combine(states, "lego", [0.5, 0.3, 0.2], rank=3, seed=4)
    got = lorakit.load_state(out)
    for path in expected.modules():
        assert_close(got.delta(path), expected.delta(path), path)


def test_other_settings_pass_through_set(dirs, tmp_path):
    states, paths = dirs
    out = tmp_path / "out"
    assert cli_main([*paths, "--method", "knots", "--set", "inner=task_arithmetic", "-o", str(out)]) == 0
    expected = combine(states, "task_arithmetic")
    for path in expected.modules():
        assert_close(lorakit.load_state(out).delta(path), expected.delta(path), path)


@pytest.mark.parametrize("args, message", [
    (["--method", "tie"], "unknown merge method 'tie'. Did you mean 'ties'"),
    (["--method", "linear", "--weights", "1", "2"], "expected 3 finite weights"),
    (["--method", "ties", "--density", "2"], "density must be in (0, 1]"),
    (["--method", "svd", "--set", "bogus=1"], "method 'svd' has no setting bogus"),
    (["--method", "svd", "--set", "rank"], "expected KNOB=VALUE"),
])
def test_user_errors_print_one_line(dirs, tmp_path, capsys, args, message):
    _, paths = dirs
    assert cli_main([*paths, *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit merge: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_adapter_and_bad_usage(tmp_path, capsys):
    assert cli_main([str(tmp_path / "nowhere"), "--method", "cat", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
    assert cli_main([str(tmp_path), "-o", "x"]) == 2  # --method missing: argparse's error, one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method" in err
    assert cli_main(["--help"]) == 0
    assert "--method" in capsys.readouterr().out


def test_dora_input_is_a_user_error(tmp_path, capsys):
    paths = [str(lorakit.save_state(toy_state(i, dora=True), tmp_path / f"d{i}")) for i in range(2)]
    assert cli_main([*paths, "--method", "linear", "-o", str(tmp_path / "o")]) == 2
    assert "DoRA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
