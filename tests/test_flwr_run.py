"""`flwr run .` runs the same apps as `smallfed simulate`: pyproject, Flower's CLI, a SuperLink.

`flwr run` starts a detached `flower-superlink` that outlives the command; the test
finds it by the FLWR_HOME folder it was given (a temporary one) and stops it by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from smallfed.config import Config
from tests.processes import pids_using, stop

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_app_config_is_the_quickstart() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(Config().to_dict())  # every key can be overridden
    assert Config.from_mapping(app_config) == Config.from_toml(
        ROOT / "simulations" / "quickstart.toml")


def test_flwr_run_dot(tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "results"
    bin_dir = Path(sys.executable).parent  # flwr starts flower-superlink from PATH
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    flwr = bin_dir / "flwr"
    command = [
        str(flwr), "run", ".", "--stream",
        "--run-config", f"num-server-rounds=2 num-clients=4 clients-per-round=4 out-dir='{out}'",
        "--federation-config", "num-supernodes=4",
    ]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log
        assert pids_using(str(home)), "expected flwr run to leave a SuperLink running"
    finally:
        stop(pids_using(str(home)))
    assert not pids_using(str(home))
    results = json.loads((out / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [0, 4, 4]
    assert results["rounds"][-1]["accuracy"] > results["rounds"][0]["accuracy"]
    assert results["config"]["num-clients"] == 4
