"""``lorakit fed`` (``lorakit.federated.cli``): run in process, write the Flower app, user errors."""
from __future__ import annotations

import json
import tomllib

from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Settings


def test_run_in_process_writes_the_history(tmp_path, capsys):
    code = cli_main(["run", "--engine", "inprocess", "--task", "toy", "--num-clients", "3", "--num-rounds", "2",
                     "--local-steps", "2", "--rank", "4", "--lora-alpha", "8", "--max-train", "120",
                     "--max-eval", "60", "--lr", "0.01", "--strategy", "ffa_lora", "-o", str(tmp_path)])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["settings"]["strategy"] == "ffa_lora"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert "accuracy" in capsys.readouterr().out


def test_app_writes_a_flower_app_with_the_run_config(tmp_path):
    assert cli_main(["app", str(tmp_path / "app"), "--strategy", "flora", "--num-rounds", "7"]) == 0
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    flwr = project["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "lorakit.federated.server_app:app",
                                  "clientapp": "lorakit.federated.client_app:app"}
    assert flwr["config"]["strategy"] == "flora" and flwr["config"]["num-rounds"] == 7
    assert Settings.from_config(flwr["config"]) == Settings(strategy="flora", num_rounds=7)


def test_unknown_strategy_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["run", "--engine", "inprocess", "--strategy", "flor", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit fed: error: unknown federated strategy 'flor'") and "flora" in err


def test_unknown_run_config_keys_list_the_known_ones():
    import pytest

    with pytest.raises(ValueError, match="unknown run config key 'rounds'.*num-rounds"):
        Settings.from_config({"rounds": 3})
