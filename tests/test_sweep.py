"""The trade-off workbench: a small grid runs, resumes without recomputing, and plots."""

from __future__ import annotations

import csv
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

import smallfed.sweep
from smallfed.cli import main
from smallfed.config import Config, ConfigError
from smallfed.report.tradeoff import pareto_front
from smallfed.sweep import finished, load_sweep, point_dir

SWEEP = """
seeds = [3]
out = "{out}"
workers = 2
[set]
num-server-rounds = 1
num-clients = 4
clients-per-round = 4
local-epochs = 1
batch-size = 32
[axes.codec]
dense = {{}}
sign = {{codec = "sign,error_feedback"}}
[axes.devices]
none = {{}}
rpi = {{devices = "rpi4:1", target-accuracy = 0.1}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text.format(out=tmp_path / "out"))
    return path


def test_pareto_front_keeps_points_nothing_beats() -> None:
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4), (2.0, 0.7)]
    assert pareto_front(points) == [3, 0, 1]


def test_a_small_sweep_runs_resumes_and_reports(tmp_path: Path) -> None:
    config = write(tmp_path, SWEEP)
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 0
    out = tmp_path / "out"
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["point"] for r in rows] == [
        "codec=dense,devices=none,seed=3", "codec=dense,devices=rpi,seed=3",
        "codec=sign,devices=none,seed=3", "codec=sign,devices=rpi,seed=3"]
    by_point = {r["point"]: r for r in rows}
    assert int(by_point["codec=sign,devices=none,seed=3"]["total_bytes_up"]) < int(
        by_point["codec=dense,devices=none,seed=3"]["total_bytes_up"]) / 20
    assert by_point["codec=dense,devices=none,seed=3"]["sim_time_s"] == ""  # no devices
    assert float(by_point["codec=dense,devices=rpi,seed=3"]["sim_time_s"]) > 0

    sweep = load_sweep(config)
    older = point_dir(sweep, sweep.points[0]) / "results.json"  # run before a key existed
    results = json.loads(older.read_text())
    del results["config"]["resume"]
    older.write_text(json.dumps(results))
    stamps = {p.name: (point_dir(sweep, p) / "results.json").stat().st_mtime_ns
              for p in sweep.points}
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 0  # all finished
    assert stamps == {p.name: (point_dir(sweep, p) / "results.json").stat().st_mtime_ns
                      for p in sweep.points}

    assert main(["report", str(out)]) == 0
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (out / "accuracy_vs_time.png").is_file()
    assert not (out / "accuracy_vs_epsilon.png").exists()  # no private point
    report = (out / "report.md").read_text()
    assert "![Final accuracy against upload bytes](accuracy_vs_bytes.png)" in report
    assert (out / "accuracy_vs_bytes.pdf").read_bytes()[:4] == b"%PDF"


def test_a_bad_point_fails_before_any_run(tmp_path: Path) -> None:
    config = write(tmp_path, SWEEP.replace('rpi4:1"', 'rpi4:1", lr = -1.0'))
    with pytest.raises(ConfigError, match="sweep point codec=dense,devices=rpi,seed=3: lr"):
        load_sweep(config)
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "message"), [
    (("seeds = [3]", "seeds = 3"), "seeds must be a list of distinct integers"),
    (("seeds = [3]", "seeds = [3, 3]"), "seeds must be a list of distinct integers"),
    (("workers = 2", 'workers = "two"'), "workers must be a whole number"),
    (("dense = {{}}", "dense = 1"), "options are tables"),
])
def test_malformed_sweep_files_are_refused_clearly(tmp_path: Path, change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, SWEEP.replace(*change)))


def test_a_point_stopped_midway_is_run_again(tmp_path: Path) -> None:
    """results.json is written after every round: only the last round makes it finished."""
    sweep = load_sweep(write(tmp_path, SWEEP))
    point = sweep.points[0]
    folder = point_dir(sweep, point)
    folder.mkdir(parents=True)
    results = {"config": point.config.to_dict(), "rounds": [{"round": 0}], "summary": {}}
    (folder / "results.json").write_text(json.dumps(results))
    assert finished(sweep, point) is None
    results["rounds"].append({"round": 1})  # num-server-rounds = 1
    (folder / "results.json").write_text(json.dumps(results))
    assert finished(sweep, point) == results


def slow_point(args: tuple[Config, str]) -> dict[str, Any]:
    """A point that says it started, then runs far longer than the test waits."""
    out = Path(args[1])
    out.mkdir(parents=True)
    (out / "started").touch()
    time.sleep(300)
    return {}


def test_ctrl_c_stops_the_running_point_and_drops_the_queued_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, SWEEP.replace("workers = 2", "workers = 1"))
    sweep = load_sweep(config)

    def started() -> list[str]:
        return [p.name for p in sweep.points if (point_dir(sweep, p) / "started").exists()]

    def ctrl_c_once_a_point_runs(jobs: Any) -> Any:
        deadline = time.monotonic() + 120
        while not started() and time.monotonic() < deadline:
            time.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(smallfed.sweep, "_run_point", slow_point)
    monkeypatch.setattr(smallfed.sweep, "as_completed", ctrl_c_once_a_point_runs)
    begun = time.monotonic()
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 130
    assert time.monotonic() - begun < 150  # the running point was not waited for
    assert started() == [sweep.points[0].name]  # the 3 queued points never ran
    assert not multiprocessing.active_children()
    err = " ".join(capsys.readouterr().err.split())
    assert f"go on with: smallfed sweep --config {config}" in err
