"""Checkpoints: a run stopped after a round and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smallfed.cli import main
from smallfed.config import Config, ConfigError
from smallfed.flower.checkpoint import load
from smallfed.report.results import RoundRecord
from smallfed.simulation import simulate

# Stateful everywhere it can be: server momentum, client error-feedback residuals,
# sample-level DP accountants (reproducible noise), client sampling (4 of 6), pruning.
CFG = Config(num_server_rounds=4, num_clients=6, clients_per_round=4, seed=11,
             local_epochs=1, batch_size=32, strategy="fedavgm", server_momentum=0.5,
             codec="topk:0.1,quantize:4,error_feedback", privacy="sample", dp_noise=0.8,
             dp_accountant="rdp", dp_reproducible=True, prune="unstructured",
             prune_sparsity=0.5, prune_end_round=3)


class Stop(Exception):
    """Stands for a crash after a round."""


def stop_after(round_: int):
    def hook(record: RoundRecord, _: int) -> None:
        if record.round == round_:
            raise Stop

    return hook


# A resumed run discovers its nodes again, and they join again, as a restarted
# deployment's would: its first round's messages and wire estimate are its own.
RESTART = {"messages_up", "messages_down", "objects_up", "objects_down",
           "bytes_up_wire_est", "bytes_down_wire_est", "dense_bytes_up_wire_est"}


def without_times(results: dict, restarted: int = -1) -> list[dict]:
    """The rounds without wall times, and without the restart's traffic in round
    ``restarted``."""
    return [{k: v for k, v in r.items()
             if k != "wall_time_s" and (r["round"] != restarted or k not in RESTART)}
            for r in results["rounds"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("whole")
    return simulate(CFG, out, progress=False), out


def test_resume_gives_the_uninterrupted_run(uninterrupted, tmp_path: Path) -> None:
    whole, whole_dir = uninterrupted
    with pytest.raises(Stop):
        simulate(CFG, tmp_path, progress=False, on_round=stop_after(2))
    stopped = load(tmp_path)
    assert stopped.round == 2 and len(stopped.clients) > 0  # residuals and DP histories
    ran: list[int] = []
    resumed = simulate(CFG, tmp_path, progress=False, resume=True,
                       on_round=lambda record, _: ran.append(record.round))
    assert ran == [3, 4]  # only the rounds after the checkpoint
    assert without_times(resumed, restarted=3) == without_times(whole, restarted=3)
    assert resumed["rounds"][3]["messages_down"] > whole["rounds"][3]["messages_down"]
    assert resumed["summary"]["epsilon"] == whole["summary"]["epsilon"]
    final, expected = load(tmp_path), load(whole_dir)
    assert final.round == 4
    for name, values in expected.global_arrays.items():
        np.testing.assert_array_equal(final.global_arrays[name], values)


def test_resume_refuses_another_configuration(uninterrupted) -> None:
    _, whole_dir = uninterrupted
    with pytest.raises(ConfigError, match="lr: 0.05 in the checkpoint, 0.5 given"):
        simulate(CFG.replace(lr=0.5), whole_dir, progress=False, resume=True)


def test_resume_without_a_checkpoint_fails_clearly(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_stop_between_the_renames_keeps_the_previous_checkpoint(uninterrupted, tmp_path) -> None:
    import shutil

    _, whole_dir = uninterrupted
    shutil.copytree(whole_dir / "checkpoint", tmp_path / "checkpoint.old")  # no checkpoint/
    assert load(tmp_path).round == 4
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="the checkpoint is unreadable"):
        load(tmp_path)


def test_ray_refuses_to_resume_client_state_it_cannot_save(uninterrupted) -> None:
    from smallfed.flower.checkpoint import check_resumable

    _, whole_dir = uninterrupted
    saved = load(whole_dir)
    cfg = Config(backend="ray", privacy="sample", dp_noise=1.0)
    saved.config = cfg.to_dict()
    with pytest.raises(ConfigError, match="accountants live on the clients"):
        check_resumable(cfg, saved)
    for codec in ("topk:0.1,error_feedback", "topk:0.1,ef"):  # residuals restart: allowed
        cfg = Config(backend="ray", codec=codec)
        saved.config = cfg.to_dict()
        check_resumable(cfg, saved)


def test_a_deployed_runs_checkpoint_holds_no_client_state(uninterrupted) -> None:
    """A checkpoint written by `flwr run` (devices) has no client state even for an
    in-process configuration: resuming it must not pretend otherwise."""
    from smallfed.flower.checkpoint import check_resumable

    _, whole_dir = uninterrupted
    saved = load(whole_dir)
    saved.clients = {}
    with pytest.raises(ConfigError, match="accountants live on the clients"):
        check_resumable(CFG, saved)
    saved.round = 0  # nothing trained yet: nothing to lose
    check_resumable(CFG, saved)


def test_resume_with_set_changes_the_checkpoints_configuration(uninterrupted, capsys) -> None:
    _, whole_dir = uninterrupted
    code = main(["simulate", "--resume", str(whole_dir), "--set", "lr=0.5", "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "(lr: 0.05 in the checkpoint, 0.5 given)" in error


def test_a_restarted_server_app_resumes_from_out_dir(tmp_path: Path) -> None:
    """As after `flwr run` restarts a stopped ServerApp: resume = true, clients not saved."""
    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.server import build_server_app

    cfg = Config(num_server_rounds=3, num_clients=4, clients_per_round=3, seed=4,
                 local_epochs=1, batch_size=32, strategy="fedavgm", server_momentum=0.5,
                 codec="topk:0.2,quantize:4", out_dir=str(tmp_path / "run"))

    def server_app(cfg: Config, on_round=None) -> None:
        grid = InProcessGrid(build_client_app(cfg), 4, run_config=cfg.to_dict())
        build_server_app(cfg, on_round=on_round)(grid, grid.server_context())

    with pytest.raises(Stop):
        server_app(cfg, stop_after(1))
    server_app(cfg.replace(resume=True))
    whole = cfg.replace(out_dir=str(tmp_path / "whole"))
    server_app(whole)
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    expected = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert without_times(resumed, restarted=2) == without_times(expected, restarted=2)
    # Error feedback's residuals stay behind on the clients: the resumed run starts them
    # from zero and goes on to the end.
    ef = cfg.replace(codec="topk:0.2,error_feedback", out_dir=str(tmp_path / "ef"))
    with pytest.raises(Stop):
        server_app(ef, stop_after(1))
    server_app(ef.replace(resume=True))
    rounds = json.loads((tmp_path / "ef" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["clients"] == 3 and r["updates_rejected"] == 0 for r in rounds[1:])


def test_clients_csv_grows_outside_the_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    """Device rows are appended to clients.csv each round; the checkpoint keeps their
    count only, and a resume drops rows of a round the checkpoint did not finish."""
    cfg = Config(num_server_rounds=3, num_clients=8, clients_per_round=4, seed=5,
                 local_epochs=1, batch_size=32, devices="rpi4:0.5,phone-low:0.5")
    whole = tmp_path / "whole"
    simulate(cfg, whole, progress=False)
    stopped = tmp_path / "stopped"
    with pytest.raises(Stop):
        simulate(cfg, stopped, progress=False, on_round=stop_after(2))
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert "clients" not in state["server"]["recorder"]
    assert state["server"]["recorder"]["clients_rows"] == 8  # two rounds of 4
    with open(stopped / "clients.csv", "a") as fh:  # a round 3 that never checkpointed
        fh.write("3,99,rpi4,finished,1,1,1.0,1.0,1.0\n")
    simulate(cfg, stopped, progress=False, resume=True)
    assert (stopped / "clients.csv").read_bytes() == (whole / "clients.csv").read_bytes()
    assert len((whole / "clients.csv").read_text().splitlines()) == 1 + 12
    with pytest.raises(Stop):  # a lost clients.csv warns, and blocks nothing
        simulate(cfg, tmp_path / "again", progress=False, on_round=stop_after(2))
    (tmp_path / "again" / "clients.csv").unlink()
    with pytest.warns(UserWarning, match="it starts again with the resumed rounds"):
        simulate(cfg, tmp_path / "again", progress=False, resume=True)
    assert len((tmp_path / "again" / "clients.csv").read_text().splitlines()) == 1 + 4


def test_one_run_at_a_time_writes_to_an_out_dir(tmp_path: Path) -> None:
    """A run restarted right after a stop waits for the stopped one (another process)
    to let go of the out-dir; within one process the lock is re-entrant."""
    import subprocess
    import sys

    from smallfed.flower.checkpoint import out_dir_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from smallfed.flower.checkpoint import out_dir_lock\n"
         f"with out_dir_lock(Path({str(tmp_path)!r})):\n"
         "    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another run has been writing there"):
            with out_dir_lock(tmp_path, wait_s=1.0):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with out_dir_lock(tmp_path, wait_s=1.0):  # free again, and re-entrant here
        with out_dir_lock(tmp_path, wait_s=1.0):
            pass
