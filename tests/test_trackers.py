"""Experiment trackers: TensorBoard's event files, read back, hold results.json's rounds; a
missing package is refused with the configuration; a tracker failing mid-run only warns."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from smallfed.config import Config, ConfigError
from smallfed.report.results import RoundRecord
from smallfed.report.trackers import PACKAGES, TensorBoardTracker, check_tracker, open_tracker
from smallfed.simulation import simulate

CFG = Config(num_server_rounds=2, num_clients=4, clients_per_round=4, seed=7, local_epochs=1,
             batch_size=16, tracker="tensorboard")


class Stop(Exception):
    """Stands for a crash after a round."""


def events(folder: Path) -> EventAccumulator:
    return EventAccumulator(str(folder)).Reload()


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def as_logged(rounds: list[dict], field: str) -> list[tuple[int, float]]:
    """What TensorBoard holds of a results.json field: float32 values at step = round."""
    return [(r["round"], float(np.float32(r[field]))) for r in rounds]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A run stopped after round 1 and resumed: two writers, one event folder."""
    out = tmp_path_factory.mktemp("tracked")

    def stop_after_1(record: RoundRecord, _: int) -> None:
        if record.round == 1:
            raise Stop

    with pytest.raises(Stop):
        simulate(CFG, out, progress=False, on_round=stop_after_1)
    return simulate(CFG, out, progress=False, resume=True), out


def test_event_files_hold_every_round_of_results_json(resumed_run) -> None:
    results, out = resumed_run
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = events(out / "tensorboard")
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for field in ("accuracy", "loss", "bytes_up", "bytes_down", "clients"):
        assert scalars(acc, f"round/{field}") == as_logged(rounds, field)
    tags = set(acc.Tags()["scalars"])
    assert "round/epsilon" not in tags and "round/sim_time_s" not in tags  # None: no DP, no devices
    assert "round/round" not in tags  # the step
    summary = results["summary"]
    assert scalars(acc, "summary/final_accuracy") == [
        (2, float(np.float32(summary["final_accuracy"])))]
    assert "summary/privacy" not in tags


def test_log_round_skips_none_and_what_is_not_a_number(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(CFG, tmp_path)
    tracker.log_round({"round": 4, "accuracy": 0.5, "bytes_up": 1200, "epsilon": None,
                       "sim_time_s": None})
    tracker.log_summary({"final_accuracy": 0.5, "privacy": None, "wire_model": {"a": 1.0},
                         "flag": True})
    tracker.close()
    acc = events(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {"round/accuracy", "round/bytes_up",
                                          "summary/final_accuracy"}
    assert scalars(acc, "round/bytes_up") == [(4, 1200.0)]
    assert scalars(acc, "summary/final_accuracy") == [(4, 0.5)]
    assert "config" in "".join(acc.Tags()["tensors"])  # add_text: the configuration
    assert not tracker.failed


def test_an_unknown_tracker_is_refused() -> None:
    with pytest.raises(ConfigError, match="tracker: 'comet' is not one of none, tensorboard, "
                                          "wandb, mlflow"):
        Config(tracker="comet")


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_tracker_needs_its_package_on_the_server_only(name: str, tmp_path: Path) -> None:
    """Devices build the same Config and need no tracker: simulate refuses, before any
    work, and Config itself accepts."""
    assert Config(tracker=name).tracker == name
    module, command = PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        with pytest.raises(ConfigError, match=f"tracker: '{name}' needs the {module} package"
                           ) as err:
            simulate(CFG.replace(tracker=name), tmp_path / "out", progress=False)
        assert command in str(err.value)
        assert not (tmp_path / "out").exists()  # nothing written
    else:
        check_tracker(name)


def test_a_missing_tensorboard_is_refused(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "smallfed\[tensorboard\]"'):
        simulate(CFG.replace(tracker="tensorboard"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_cannot_start_stops_the_run_before_round_1(tmp_path: Path) -> None:
    blocked = tmp_path / "out"
    blocked.write_text("a file where the run folder should be")
    with pytest.raises(RuntimeError, match="tracker: 'tensorboard' could not start"):
        open_tracker(CFG, blocked)


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_scalar = SummaryWriter.add_scalar

    def disk_full_from_round_2(self, tag, value, step=None, *args, **kwargs):
        if step is not None and step >= 2:
            raise OSError(28, "No space left on device")
        return add_scalar(self, tag, value, step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full_from_round_2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = simulate(CFG, tmp_path, progress=False)
    failures = [w for w in caught if "tracker 'tensorboard' failed" in str(w.message)]
    assert len(failures) == 1 and "No space left on device" in str(failures[0].message)
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["rounds"] == results["rounds"]
    acc = events(tmp_path / "tensorboard")
    assert scalars(acc, "round/accuracy") == as_logged(results["rounds"][:2], "accuracy")
    assert "summary/final_accuracy" not in acc.Tags()["scalars"]  # stopped at round 2
