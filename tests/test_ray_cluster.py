"""A real two-node Ray cluster on loopback: a sweep whose points run as Ray tasks, one
on each node, their files written back where a local sweep puts them; a point no node
can hold, refused; a Ctrl-C that cancels a running point; and a `backend = "ray"`
simulation whose client actors run on the cluster, with the same rounds as in-process.
Each node has one CPU and every point and client asks for one, so two of them run on
two nodes. An address where no Ray answers fails at once, naming ray-address. The
cluster's processes are stopped by their process groups' PIDs, also when a test fails.
"""

from __future__ import annotations

import _thread
import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from smallfed.cli import main
from smallfed.config import Config, ConfigError
from smallfed.simulation import simulate
from smallfed.sweep import load_sweep, point_dir
from tests.processes import descendants, pids_using, stop
from tests.test_deploy import free_port
from tests.test_simulation import without_times

RAY = Path(sys.executable).parent / "ray"

SWEEP = """
seeds = [5]
out = "{out}"
workers = 2
[set]
num-server-rounds = {rounds}
num-clients = 4
clients-per-round = 4
batch-size = 32
data-dir = "relative/data"
{extra}
[axes.codec]
dense = {{}}
{sign}
"""


def write_sweep(folder: Path, rounds: int = 2, extra: str = "", sign: bool = True) -> Path:
    """Two points (one without ``sign``), ``rounds`` rounds each, out in ``folder/out``."""
    path = folder / "sweep.toml"
    path.write_text(SWEEP.format(out=folder / "out", rounds=rounds, extra=extra,
                                 sign='sign = {codec = "sign,error_feedback"}' if sign else ""))
    return path


def start_node(log: Path, *args: str) -> subprocess.Popen:
    """`ray start --block`, in a session of its own (one process group to stop), without
    the helpers a test does not need: each is a Python process that imports Ray."""
    with open(log, "w") as out:
        return subprocess.Popen([str(RAY), "start", "--num-cpus=1", "--block",
                                 "--disable-usage-stats", "--include-log-monitor=false",
                                 *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(log.parent)})


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM to each node's process group (`ray start` ends its processes), then
    whatever is left is killed."""
    pids = [pid for node in nodes for pid in descendants(node.pid)]
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for node in nodes:  # reaped: else stop() would wait for a zombie
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    stop([pid for pid in pids if Path(f"/proc/{pid}").exists()])


def wait_for_head(head: subprocess.Popen, port: int, log: Path, timeout: float = 60) -> None:
    """Until the head's GCS listens; its log if it ended or did not come up."""
    deadline = time.monotonic() + timeout
    while head.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the Ray head did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The head's address. Ray's socket paths under the temporary folder must stay below
    108 characters: a short one. It is the nodes' TMPDIR too, so the point folders of
    cancelled tasks go with it."""
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [start_node(temp / "head.log", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={port}", '--resources={"head": 1}', f"--temp-dir={temp}",
                        "--include-dashboard=false", "--no-monitor",
                        f"--ray-client-server-port={free_port()}")]  # 10001 may be taken
    try:
        wait_for_head(nodes[0], port, temp / "head.log")
        nodes.append(start_node(temp / "second.log", f"--address={address}",
                                '--resources={"second": 1}'))
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        try:
            deadline = time.monotonic() + 60
            while sum(n["Alive"] for n in ray.nodes()) < 2:
                assert time.monotonic() < deadline, (temp / "second.log").read_text()
                time.sleep(0.5)
        finally:
            ray.shutdown()
        yield address
    finally:
        stop_nodes(nodes)
        shutil.rmtree(temp, ignore_errors=True)


def test_an_address_where_no_ray_answers_is_refused_clearly(tmp_path: Path,
                                                            tiny_cfg: Config) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"ray-address: no Ray cluster answers at {dead}"):
        simulate(tiny_cfg.replace(backend="ray", ray_address=dead), tmp_path, progress=False)
    assert main(["sweep", "--config", str(write_sweep(tmp_path)), "--ray-address", dead,
                 "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="backend = 'ray' starts a Ray engine of its own"):
        load_sweep(write_sweep(tmp_path, extra='backend = "ray"'), ray_address=dead)


@pytest.fixture(scope="module")
def swept(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep file of a sweep run on the cluster (from its own folder, against which
    the relative data-dir is made absolute)."""
    folder = tmp_path_factory.mktemp("swept")
    config = write_sweep(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["sweep", "--config", str(config), "--ray-address", cluster,
                     "--no-progress"]) == 0
    return config


def test_sweep_points_run_on_both_nodes_and_land_in_out(
        swept: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(swept.parent)  # where the sweep ran: its data-dir is relative
    sweep = load_sweep(swept)
    for point in sweep.points:
        folder = point_dir(sweep, point)
        results = json.loads((folder / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
        assert results["config"]["data-dir"] == str(swept.parent / "relative/data")
        assert (folder / "rounds.csv").is_file()
        assert (folder / "checkpoint" / "state.json").is_file()
    with open(sweep.out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["point"] for r in rows] == [p.name for p in sweep.points]
    assert len({r["node_id"] for r in rows}) == 2  # one point on each node
    assert all(r["node"] for r in rows)

    stamps = [(point_dir(sweep, p) / "results.json").stat().st_mtime_ns for p in sweep.points]
    assert main(["sweep", "--config", str(swept), "--no-progress"]) == 0  # all finished
    assert stamps == [(point_dir(sweep, p) / "results.json").stat().st_mtime_ns
                      for p in sweep.points]


def test_a_point_no_node_can_hold_is_refused(cluster: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = write_sweep(tmp_path, extra="client-cpus = 2.0")
    assert main(["sweep", "--config", str(config), "--ray-address", cluster,
                 "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "client-cpus 2 and client-gpus 0 (what its task reserves) fit on no node" in err
    assert not ray.is_initialized()


def test_ctrl_c_cancels_the_running_point(cluster: str, tmp_path: Path) -> None:
    config = write_sweep(tmp_path, rounds=100_000, sign=False)  # never finishes first
    running: list[int] = []  # the Ray worker that runs the point (titled by its task)

    def ctrl_c_once_the_point_runs() -> None:
        deadline = time.monotonic() + 60
        while not running and time.monotonic() < deadline:
            running.extend(pids_using("ray::codec=dense,seed=5"))
            time.sleep(0.1)
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c_once_the_point_runs, daemon=True).start()
    assert main(["sweep", "--config", str(config), "--ray-address", cluster,
                 "--no-progress"]) == 130
    assert running
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in running):
        assert time.monotonic() < deadline, "the cancelled point's worker still runs"
        time.sleep(0.2)
    assert not list((tmp_path / "out").glob("points/*/results.json"))


def test_ray_simulation_on_the_cluster_gives_the_same_rounds(cluster: str, swept: Path,
                                                             tmp_path: Path) -> None:
    """Against the sweep's dense point: the same configuration, run in-process."""
    sweep = load_sweep(swept)
    inprocess = json.loads((point_dir(sweep, sweep.points[0]) / "results.json").read_text())
    cfg = Config.from_mapping(inprocess["config"])
    assert cfg.backend == "inprocess" and cfg.codec == "none"
    on_ray = simulate(cfg.replace(backend="ray", ray_address=cluster), tmp_path,
                      progress=False)
    assert [r["clients"] for r in on_ray["rounds"]] == [0, 4, 4]
    assert without_times(on_ray) == without_times(inprocess)
    assert not ray.is_initialized()  # the engine left the cluster
