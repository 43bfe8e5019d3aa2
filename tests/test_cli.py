"""The `smallfed` command: simulate with overrides, and fail early on bad configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smallfed.cli import main

SMALL = ["--set", "num-server-rounds=1", "--set", "num-clients=4", "--set", "clients-per-round=2"]


def test_simulate_writes_results_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *SMALL, "--set", "model=mlp", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model"] == "mlp"
    assert results["config"]["alpha"] == 0.5  # the quickstart's value
    assert len(results["rounds"]) == 2
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "smallfed: rounds" in capsys.readouterr().out


def test_config_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('num-server-rounds = 1\nnum-clients = 3\nclients-per-round = 3\n'
                      'partitioner = "iid"\n')
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rounds"][1]["clients"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "alpha=0"], "alpha: 0.0 is not allowed"),
        (["--set", "rounds=3"], "rounds: unknown key"),
        (["--set", "num-clients=100000"], "num-clients: 100000 is more than"),
        (["--set", "dataset=mnist", "--set", "data-dir=/nonexistent"], "is not a folder"),
        (["--config", "missing.toml"], "does not exist"),
    ],
)
def test_bad_configuration_fails_before_any_work(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["simulate", *args, "--out", str(out)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_keys_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 0
    assert "num-server-rounds" in capsys.readouterr().out
