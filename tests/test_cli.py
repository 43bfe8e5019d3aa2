"""The `smallfed` command: simulate with overrides, and fail early on bad configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import smallfed.simulation
from smallfed.cli import load_config, main
from smallfed.config import Config

ROOT = Path(__file__).resolve().parents[1]
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


def test_the_packaged_quickstart_is_the_users_copy() -> None:
    packaged = resources.files("smallfed").joinpath("quickstart.toml").read_text()
    assert packaged == (ROOT / "simulations" / "quickstart.toml").read_text()


def test_defaults_do_not_depend_on_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no simulations/ here
    assert load_config(None, []) == Config.from_toml(ROOT / "simulations" / "quickstart.toml")
    assert load_config(None, ["lr=0.1"]).lr == 0.1


def test_a_finished_run_is_kept_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["simulate", *SMALL, "--set", "model=mlp", "--out", str(tmp_path), "--no-progress"]
    assert main(run) == 0
    first = (tmp_path / "results.json").read_bytes()
    capsys.readouterr()
    assert main(run) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_bytes() == first
    assert main(["simulate", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert main([*run, "--set", "seed=1", "--overwrite"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["seed"] == 1


def test_ctrl_c_says_how_to_resume_and_keeps_the_finished_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real, pressed = smallfed.simulation.simulate, []

    def ctrl_c_after_round_1(*args, **kwargs):  # type: ignore[no-untyped-def]
        def hook(record, _total):  # type: ignore[no-untyped-def]
            if record.round == 1 and not pressed:
                pressed.append(True)
                raise KeyboardInterrupt
        return real(*args, **kwargs, on_round=hook)

    monkeypatch.setattr(smallfed.simulation, "simulate", ctrl_c_after_round_1)
    out = tmp_path / "run"
    run = ["simulate", *SMALL, "--set", "num-server-rounds=3", "--out", str(out), "--no-progress"]
    assert main(run) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert f"go on with: smallfed simulate --resume {out}" in err
    assert "Traceback" not in err
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert main(["simulate", "--resume", str(out), "--no-progress"]) == 0
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]


def test_threads_left_running_after_ctrl_c_end_with_the_process() -> None:
    """As Flower's Ray engine leaves its ServerApp thread waiting for replies."""
    code = ("import threading, time; from smallfed.cli import exit_if_threads_linger; "
            "threading.Thread(target=time.sleep, args=(600,)).start(); exit_if_threads_linger()")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 130


def test_errors_are_printed_as_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """Rich markup would read the codec's ':global' as an emoji name and '[red]' as a style."""
    assert main(["simulate", "--set", "codec=quantize:4,topk:0.01:global"]) == 2
    assert "topk:0.01:global" in capsys.readouterr().err
    assert main(["simulate", "--set", "codec=topk:0.01:global,[red]sign"]) == 2
    err = capsys.readouterr().err
    assert "'[red]sign'" in err and "topk:A[:global]" in err


def test_keys_prints_each_keys_choices(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A doc's "[iid | dirichlet | ...]" is text, not rich markup that disappears."""
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["keys"]) == 0
    assert "[iid | dirichlet | pathological | shard]" in capsys.readouterr().out
