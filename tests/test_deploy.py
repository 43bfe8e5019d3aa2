"""A real deployment on loopback: a SuperLink with TLS and node authentication, three
SuperNodes started with `smallfed edge start`, each with its own data folder, and a
`flwr run` of six compressed rounds. One SuperNode is killed after round 1 (the run
goes on without it) and started again after round 2 (it rejoins); after round 3 the
run is stopped with `flwr stop`, and a second `flwr run` resumes it from its last
checkpoint (the `resume` key). A node with an
unregistered key and a node that does not trust the SuperLink's certificate are
refused. Every process the test starts is stopped by PID, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smallfed.config import Config
from smallfed.data import write_device_data
from smallfed.deploy.certs import make_certificates, make_node_key
from tests.processes import descendants, pids_using, stop

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def after_round(out: Path, round_: int, run: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until the run has checkpointed ``round_``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if checkpointed(out) >= round_:
            return
        time.sleep(0.5)
    raise TimeoutError(f"round {round_} not checkpointed (run exit code {run.poll()})")


def checkpointed(out: Path) -> int:
    """The last round checkpointed in ``out``, -1 before the first."""
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return -1


def stop_run(env: dict[str, str], run: subprocess.Popen) -> None:
    """`flwr stop` the one running run, and wait for its `flwr run --stream` to end."""
    listed = subprocess.run([str(BIN / "flwr"), "ls", "tls", "--format", "json"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    running = [r["run-id"] for r in json.loads(listed.stdout)["runs"]
               if r["status"].startswith("running")]
    assert len(running) == 1, listed.stdout
    stopped = subprocess.run([str(BIN / "flwr"), "stop", str(running[0]), "tls"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped
    run.wait(timeout=120)


def flwr_env(home: Path, port: int, ca: Path) -> dict[str, str]:
    """The environment of `flwr` and Flower's processes: a FLWR_HOME whose connection
    "tls" is the loopback SuperLink, and this venv's binaries first on PATH."""
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def start_superlink(procs: "Processes", tmp: Path, port: int) -> subprocess.Popen:
    """`smallfed deploy superlink` with the certificates in ``tmp/certs``, until it listens."""
    superlink = procs.start("superlink", [
        str(BIN / "smallfed"), "deploy", "superlink", "--certs", str(tmp / "certs"), "--host",
        "127.0.0.1", "--port", str(port), "--database", str(tmp / "superlink.db")])
    wait_for_port(port)
    return superlink


def federation_files(tmp: Path, cfg: Config, nodes: int, extra_keys: int = 0,
                     hosts: tuple[str, ...] = ("127.0.0.1",)
                     ) -> tuple[dict[str, Path], list[tuple[Path, Path]]]:
    """What a loopback federation needs on disk: certificates in ``tmp/certs``, a key
    pair per node (``extra_keys`` more, never given data) and ``tmp/data{i}`` holding
    partition i of ``cfg``'s split for each of the ``nodes``."""
    certs = make_certificates(tmp / "certs", list(hosts))
    keys = [make_node_key(tmp / "keys", f"node{i}") for i in range(nodes + extra_keys)]
    for i in range(nodes):
        write_device_data(cfg, i, tmp / f"data{i}")
    return certs, keys


def register(env: dict[str, str], public: Path) -> subprocess.CompletedProcess:
    """`flwr supernode register` a node's public key with the "tls" SuperLink."""
    return subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "tls"],
                          env=env, capture_output=True, text=True, timeout=60)


def edge_command(port: int, key: Path, data: Path, ca: Path,
                 smallfed: Path = BIN / "smallfed") -> list[str]:
    """`smallfed edge start` for one node of a loopback federation."""
    return [str(smallfed), "edge", "start", "--superlink", f"127.0.0.1:{port}", "--data-dir",
            str(data), "--profile", "rpi4", "--root-cert", str(ca), "--auth-key", str(key),
            "--port", str(free_port())]


def resume(procs: Processes, config: str, logs: Path) -> str:
    """A second `flwr run` of ``config`` (resume = true), to its end; its log."""
    resumed = procs.start("resumed", [str(BIN / "flwr"), "run", ".", "tls", "--stream",
                                      "--run-config", config])
    log = logs / "resumed.log"
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


class Processes:
    """Starts processes in their own sessions and stops them all, and their children."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def stop_all(self, marker: str) -> None:
        pids = [p.pid for p in self.started]
        children = [pid for p in pids for pid in pids_using(f"--parent-pid {p} ")]
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop(pids + children + pids_using(marker))
        for proc in self.started:
            proc.wait(timeout=30)


def test_tls_federation_with_node_auth(tmp_path: Path) -> None:
    certs, keys = federation_files(tmp_path, Config(num_clients=3, clients_per_round=3), 3,
                                   extra_keys=1,  # node3: a stranger, never registered
                                   hosts=("127.0.0.1", "localhost"))
    other_ca = make_certificates(tmp_path / "other-ca", ["127.0.0.1"])["ca.crt"]
    port, home, out = free_port(), tmp_path / "flwr-home", tmp_path / "results"
    env = flwr_env(home, port, certs["ca.crt"])
    procs = Processes(env, tmp_path)
    flwr = str(BIN / "flwr")

    try:
        start_superlink(procs, tmp_path, port)
        for private, public in keys[:3]:
            done = register(env, public)
            assert done.returncode == 0 and "registered successfully" in done.stdout, done
        for i in range(3):
            procs.start(f"supernode{i}", edge_command(port, keys[i][0], tmp_path / f"data{i}",
                                                      certs["ca.crt"]))

        # Logs to files, not pipes: Flower's detached helpers would hold a pipe open.
        stranger = procs.start("stranger", edge_command(port, keys[3][0], tmp_path / "data0",
                                                        certs["ca.crt"]))
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
        distrust = procs.start("distrust", edge_command(port, keys[0][0], tmp_path / "data0",
                                                        other_ca))
        assert distrust.wait(timeout=120) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "distrust.log").read_text()

        # Error feedback's residuals live in the nodes' contexts; the resumed run (a new
        # Flower run) starts them from zero.
        config = ("num-server-rounds=6 num-clients=3 clients-per-round=3 "
                  f"codec='topk:0.1,quantize:4,error_feedback' out-dir='{out}' resume=true")
        run = procs.start("run", [flwr, "run", ".", "tls", "--stream", "--run-config", config])
        after_round(out, 1, run)
        os.killpg(procs.started[1].pid, signal.SIGKILL)  # supernode0 dies
        after_round(out, 2, run)
        procs.start("supernode0-again", edge_command(port, keys[0][0], tmp_path / "data0",
                                                     certs["ca.crt"]))
        after_round(out, 3, run)
        stop_run(env, run)  # the operator stops the ServerApp mid-run ...
        assert len(json.loads((out / "results.json").read_text())["rounds"]) < 7
        # ... and starts it again; it waits for the stopped ServerApp (out-dir's lock),
        # which may still finish a round before it learns of the stop.
        resumed_log = resume(procs, config, tmp_path)
    finally:
        procs.stop_all(str(tmp_path))
    assert not pids_using(str(tmp_path))
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["clients"] for r in rounds][:3] == [0, 3, 2]  # round 2 went on without it
    # Sent to the dead node, its message comes back "Node Unavailable" once it misses two
    # heartbeats (or, had Flower already noticed, it would not have been sampled).
    assert rounds[2]["clients_failed"] <= 1
    # It came back (a restart takes seconds; four rounds leave it time) and was sampled.
    assert any(r["clients"] == 3 for r in rounds[3:])
    assert all(r["updates_rejected"] == 0 for r in rounds)
    assert results["summary"]["compression_ratio_up"] > 10
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    # The resumed run went on after the last checkpoint of the stopped one: every round
    # once, the rounds before the stop as recorded then.
    assert [r["round"] for r in rounds] == list(range(7))
    resumed_after = re.search(rf"resuming {out} after round (\d) of 6", resumed_log)
    assert resumed_after and 3 <= int(resumed_after.group(1)) < 6
    assert "residuals live on the clients" in resumed_log


# A hostile device: its own code (here, Python's sitecustomize hook in every process the
# node starts) rewrites the replies the server's ClientApp built, as a modified app would.
HOSTILE = """
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

_honest = ClientApp.__call__


def _hostile(self, message, context):
    reply = _honest(self, message, context)
    if message.metadata.message_type != "train" or reply.has_error():
        return reply
    server_round = int(message.content["config"]["server-round"])
    sent, arrays = message.content["arrays"], reply.content["arrays"]
    if server_round == 1:  # its update scaled by a million
        reply.content["arrays"] = ArrayRecord({
            k: Array(sent[k].numpy() + 1e6 * (a.numpy() - sent[k].numpy()))
            for k, a in arrays.items()})
    elif server_round == 2:  # a billion examples, for FedAvg's weights
        reply.content["metrics"]["num-examples"] = 1e9
    elif server_round == 3:  # 64 MiB more than any update
        arrays["junk"] = Array(np.zeros(64 << 20, np.uint8))
    return reply


ClientApp.__call__ = _hostile
"""


def test_a_hostile_authenticated_node_is_bounded_and_named(tmp_path: Path) -> None:
    """One of three registered SuperNodes sends a scaled update, then claims a billion
    examples, then a 64 MiB reply: every round completes, its influence is bounded, and
    the ServerApp's log names the node each time."""
    certs, keys = federation_files(tmp_path, Config(num_clients=3, clients_per_round=3), 3)
    port, out = free_port(), tmp_path / "results"
    env = flwr_env(tmp_path / "flwr-home", port, certs["ca.crt"])
    (tmp_path / "hostile").mkdir()
    (tmp_path / "hostile" / "sitecustomize.py").write_text(HOSTILE)
    procs = Processes(env, tmp_path)
    config = f"num-server-rounds=3 num-clients=3 clients-per-round=3 out-dir='{out}'"
    try:
        start_superlink(procs, tmp_path, port)
        for i, (private, public) in enumerate(keys):
            register(env, public).check_returncode()
            node_env = dict(env, PYTHONPATH=str(tmp_path / "hostile")) if i == 2 else None
            procs.start(f"supernode{i}", edge_command(port, private, tmp_path / f"data{i}",
                                                      certs["ca.crt"]), env=node_env)
        run = procs.start("run", [str(BIN / "flwr"), "run", ".", "tls", "--stream",
                                  "--run-config", config])
        assert run.wait(timeout=600) == 0
    finally:
        procs.stop_all(str(tmp_path))
    log = (tmp_path / "run.log").read_text()
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["updates_clipped"] >= 1  # the scaled update, cut to the bound
    assert rounds[3]["updates_rejected"] == 1 and rounds[3]["clients"] == 2
    assert all(r["rolled_back"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    scaled = re.search(r"Round 1: the update of node (\d+) \(norm [^)]*\) scaled", log)
    claimed = re.search(r"Round 2: node (\d+) claims 1e\+09 examples; counted as", log)
    oversized = re.search(r"Round 3: rejected the update of node (\d+): 67,", log)
    assert scaled and claimed and oversized, log[-4000:]
    assert scaled.group(1) == claimed.group(1) == oversized.group(1)


def waits_on(message_type: str, seconds: int) -> str:
    """A sitecustomize for a device that, when a ``message_type`` message reaches its
    ClientApp, says so in the file $SMALLFED_TEST_MARKER and then waits ``seconds``
    before answering (a slow device, or one that dies there once the test kills it)."""
    return f"""
import os, time
from pathlib import Path
from flwr.clientapp import ClientApp

_honest = ClientApp.__call__


def _waits(self, message, context):
    if message.metadata.message_type == {message_type!r}:
        Path(os.environ["SMALLFED_TEST_MARKER"]).write_text({message_type!r})
        time.sleep({seconds})
    return _honest(self, message, context)


ClientApp.__call__ = _waits
"""


# A slow device: its train handler says so in a file, then takes 60 s before training.
SLOW = waits_on("train", 60)


def test_a_node_killed_while_training_and_a_superlink_restart(tmp_path: Path) -> None:
    """Round 1: a SuperNode is killed while it trains; once it misses its heartbeats the
    SuperLink answers for it with a "Node Unavailable" error (from node 1, the SuperLink
    itself), and the round completes with the other two. After
    round 2 the SuperLink is killed with the ServerApp it started; it starts again on
    its database, and a second `flwr run` (resume = true) finishes the run from
    smallfed's checkpoint."""
    certs, keys = federation_files(tmp_path, Config(num_clients=3, clients_per_round=3), 3)
    port, out = free_port(), tmp_path / "results"
    env = flwr_env(tmp_path / "flwr-home", port, certs["ca.crt"])
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW)
    marker = tmp_path / "training"
    procs = Processes(env, tmp_path)
    config = f"num-server-rounds=4 num-clients=3 clients-per-round=3 out-dir='{out}' resume=true"

    def node(i: int, name: str, slow: bool = False) -> subprocess.Popen:
        node_env = dict(env, PYTHONPATH=str(tmp_path / "slow"),
                        SMALLFED_TEST_MARKER=str(marker)) if slow else None
        return procs.start(name, edge_command(port, keys[i][0], tmp_path / f"data{i}",
                                              certs["ca.crt"]), env=node_env)

    try:
        superlink = start_superlink(procs, tmp_path, port)
        for i, (private, public) in enumerate(keys):
            register(env, public).check_returncode()
        slow = node(0, "supernode0", slow=True)
        nodes = [node(1, "supernode1"), node(2, "supernode2")]
        run = procs.start("run", [str(BIN / "flwr"), "run", ".", "tls", "--stream",
                                  "--run-config", config])
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the slow node never started training"
        os.killpg(slow.pid, signal.SIGKILL)  # mid-training
        after_round(out, 2, run)
        for pid in descendants(superlink.pid):  # the SuperLink, and the ServerApp it ran
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.wait(timeout=120)
        done_before = checkpointed(out)
        start_superlink(procs, tmp_path, port)  # on the same superlink.db
        alive = [n for n in nodes if n.poll() is None]
        node(0, "supernode0-again")  # the resumed run's first round waits for all three
        resumed_log = resume(procs, config, tmp_path)
    finally:
        procs.stop_all(str(tmp_path))
    assert not pids_using(str(tmp_path))
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert (rounds[1]["clients"], rounds[1]["clients_failed"]) == (2, 1)
    assert re.search(rf"resuming {out} after round {done_before} of 4", resumed_log)
    assert len(alive) == 2  # the SuperNodes outlived the SuperLink and reconnected
    assert all(r["clients"] >= 1 for r in rounds[1:])


# A device that dies between its masked upload and the unmasking: when the unmask
# message reaches it, it says so in a file and waits to be killed.
DIES_BEFORE_UNMASK = waits_on("query.secagg_unmask", 600)


def test_secure_aggregation_survives_a_node_killed_before_unmasking(tmp_path: Path) -> None:
    """Four SuperNodes run SecAgg+ with distributed DP over TLS; one is killed after it
    sent its masked update, before it sends its unmasking shares. The other three rebuild
    its self-mask, so the round sums all four updates; the server never holds one alone."""
    cfg = Config(num_clients=4, clients_per_round=4)
    certs, keys = federation_files(tmp_path, cfg, 4)
    port, out = free_port(), tmp_path / "results"
    env = flwr_env(tmp_path / "flwr-home", port, certs["ca.crt"])
    (tmp_path / "dies").mkdir()
    (tmp_path / "dies" / "sitecustomize.py").write_text(DIES_BEFORE_UNMASK)
    marker = tmp_path / "unmasking"
    procs = Processes(env, tmp_path)
    config = (f"num-server-rounds=1 num-clients=4 clients-per-round=4 out-dir='{out}' "
              "secure-aggregation=true privacy='user' dp-noise=0.5 dp-clip=0.5 "
              "fraction-evaluate=0.0")
    try:
        start_superlink(procs, tmp_path, port)
        nodes = []
        for i, (private, public) in enumerate(keys):
            register(env, public).check_returncode()
            node_env = dict(env, PYTHONPATH=str(tmp_path / "dies"),
                            SMALLFED_TEST_MARKER=str(marker)) if i == 0 else None
            nodes.append(procs.start(f"supernode{i}", edge_command(
                port, private, tmp_path / f"data{i}", certs["ca.crt"]), env=node_env))
        run = procs.start("run", [str(BIN / "flwr"), "run", ".", "tls", "--stream",
                                  "--run-config", config])
        deadline = time.monotonic() + 400
        while not marker.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), (tmp_path / "run.log").read_text()[-3000:]
        os.killpg(nodes[0].pid, signal.SIGKILL)  # after its masked update, before unmasking
        assert run.wait(timeout=300) == 0
    finally:
        procs.stop_all(str(tmp_path))
    assert not pids_using(str(tmp_path))
    results = json.loads((out / "results.json").read_text())
    last = results["rounds"][-1]
    assert last["clients"] == 4  # the killed node's update is in the sum
    assert last["secagg_bytes_up"] > 0
    assert results["summary"]["privacy"]["mechanism"].startswith("distributed discrete")
    assert "secure sum of 4 of 4 clients" in (tmp_path / "run.log").read_text()


def test_no_training_sample_leaves_a_client(tmp_path: Path) -> None:
    """Everything clients send: only the encoded update (or the model) and metrics."""
    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.records import PAYLOAD_STYPE
    from smallfed.flower.server import build_server_app
    from smallfed.models import build_model

    sent = []
    for codec in ("none", "topk:0.1,quantize:4,error_feedback"):
        cfg = Config(num_server_rounds=1, num_clients=3, clients_per_round=3, local_epochs=1,
                     fraction_evaluate=1.0, codec=codec)
        grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict(),
                             on_reply=sent.append)
        build_server_app(cfg, tmp_path / codec)(grid, grid.server_context())
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0).state_dict()
    kinds = {m.metadata.message_type for m in sent}
    assert {"train", "evaluate", "query"} <= kinds
    for reply in sent:
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "status"}
        for value in content.metric_records["metrics"].values():
            assert isinstance(value, (int, float))  # numbers, never arrays of samples
        for record in content.array_records.values():
            for name, array in record.items():
                if array.stype == PAYLOAD_STYPE:
                    assert len(array.data) < 4 * sum(v.numel() for v in model.values())
                else:  # a dense update: exactly the model's tensors
                    assert tuple(array.shape) == tuple(model[name].shape)


def test_a_device_trains_without_the_servers_dataset(tmp_path: Path) -> None:
    """Devices hold only their data.npz: the ClientApp's configuration names a dataset
    they lack, and the model comes from the input shape and class count in the messages."""
    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.server import build_server_app

    server_cfg = Config(num_server_rounds=2, num_clients=3, clients_per_round=3,
                        local_epochs=1, fraction_evaluate=1.0,
                        codec="topk:0.1,quantize:4,error_feedback", codec_down="fp16")
    devices = []
    for i in range(3):
        write_device_data(server_cfg, i, tmp_path / f"data{i}")
        devices.append({"data-dir": str(tmp_path / f"data{i}"), "device": "rpi4"})
    device_cfg = server_cfg.replace(dataset="mnist", data_dir=str(tmp_path / "no-mnist-here"))
    replies = []
    grid = InProcessGrid(build_client_app(device_cfg), 3, run_config=server_cfg.to_dict(),
                         on_reply=replies.append, node_configs=devices)
    build_server_app(server_cfg, tmp_path / "out")(grid, grid.server_context())
    assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    rounds = json.loads((tmp_path / "out" / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [0, 3, 3]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_a_device_whose_data_does_not_fit_the_model_fails_clearly(tmp_path: Path) -> None:
    """A device with images of another shape, or labels past the class count, fails its
    reply with a message saying so; the round goes on with the others."""
    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.server import build_server_app

    cfg = Config(num_server_rounds=1, num_clients=3, clients_per_round=3, local_epochs=1,
                 fraction_evaluate=1.0)
    write_device_data(cfg, 0, tmp_path / "good")
    for name, x, y in (("shape", np.zeros((6, 1, 4, 4), np.float32), np.arange(6)),
                       ("labels", np.zeros((6, 1, 8, 8), np.float32), np.arange(6) + 8)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "data.npz", x=x, y=y)
    replies = []
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict(),
                         on_reply=replies.append,
                         node_configs=[{"data-dir": str(tmp_path / d)}
                                       for d in ("good", "shape", "labels")])
    build_server_app(cfg, tmp_path / "out")(grid, grid.server_context())
    reasons = [r.error.reason for r in replies if r.has_error()]
    assert len(reasons) == 4  # two nodes, train and evaluate
    assert sum("samples have shape (1, 4, 4), the model takes (1, 8, 8)" in r for r in reasons) == 2
    assert sum("labels outside 0 to 9, the classes of the model" in r for r in reasons) == 2
    rounds = json.loads((tmp_path / "out" / "results.json").read_text())["rounds"]
    assert rounds[1]["clients"] == 1 and rounds[1]["clients_failed"] == 2


def requirements_closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, transitively (extras left out), normalised."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


def test_a_device_imports_only_its_own_packages(tmp_path: Path) -> None:
    """A device's ClientApp, training and evaluating, and `smallfed edge start` load
    only Flower, torch and numpy and what they need: clients/requirements-edge.txt.
    Server and simulation packages would cost a device memory (opacus ~115 MB, datasets
    with pandas ~160 MB) or not be installed there at all."""
    from packaging.utils import canonicalize_name

    write_device_data(Config(num_clients=3, clients_per_round=3), 0, tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "device_imports.py"),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = {canonicalize_name(d) for d in json.loads(done.stdout.strip().splitlines()[-1])}
    # torch imports these when they are installed (torch.hub, datapipes, backends) and
    # works without them, as on a device that has only requirements-edge.txt.
    optional = {"tqdm", "dill", "opt-einsum"}
    allowed = requirements_closure(["flwr", "torch", "numpy"]) | {"smallfed"} | optional
    assert loaded - allowed == set()
    assert {"flwr", "torch", "numpy"} <= loaded
    assert not loaded & {"opacus", "ray", "datasets", "scikit-learn", "onnx", "matplotlib"}


def test_keys_are_private_and_never_overwritten(tmp_path: Path) -> None:
    private, public = make_node_key(tmp_path, "node")
    assert private.stat().st_mode & 0o777 == 0o600
    for bad in ("node", "../escape", ""):
        with pytest.raises((FileExistsError, ValueError)):
            make_node_key(tmp_path, bad)
    assert not (tmp_path.parent / "escape").exists()


def test_edge_start_says_what_is_wrong_before_connecting(tmp_path: Path) -> None:
    from smallfed.config import ConfigError
    from smallfed.deploy.launch import check_device, memory_warning, supernode_command

    with pytest.raises(ConfigError, match="no data.npz"):
        check_device(tmp_path, "rpi4", "cnn-tiny", 32)
    bad = {"shapes": (np.zeros((5, 8, 8), np.float32), np.zeros(5, np.int64)),
           "labels": (np.zeros((5, 1, 8, 8), np.float32), np.full(5, -1))}
    for problem, (x, y) in bad.items():
        np.savez(tmp_path / "data.npz", x=x, y=y)
        with pytest.raises(ConfigError, match={"shapes": "expected x", "labels": ">= 0"}[problem]):
            check_device(tmp_path, "rpi4", "cnn-tiny", 32)
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 1, 28, 28), np.float32), y=np.arange(5))
    with pytest.raises(ConfigError, match="not one of"):
        check_device(tmp_path, "toaster", "cnn-tiny", 32)
    with pytest.raises(ConfigError, match="profile iot allows"):
        check_device(tmp_path, "iot", "cnn-tiny", 32)
    assert "5 samples of shape (1, 28, 28)" in check_device(tmp_path, "rpi4", "cnn-tiny", 32)
    with pytest.raises(ConfigError, match="--root-cert"):
        supernode_command("host:8000", tmp_path, "rpi4", None, None)
    for available_kb, warns in ((200 * 1024, True), (4 * 2**20, False)):
        (tmp_path / "meminfo").write_text(f"MemTotal: 8000000 kB\nMemAvailable: {available_kb} kB\n")
        assert bool(memory_warning(tmp_path / "meminfo")) == warns
    assert memory_warning(tmp_path / "absent") == ""
