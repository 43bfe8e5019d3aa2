"""A deployed federation on loopback: 10 SuperNodes over TLS with node authentication.

The SuperLink and 10 SuperNodes (`smallfed deploy superlink`, `smallfed edge start`,
each with its own MNIST partition) run 3 rounds of cnn-tiny through `flwr run`. The
script records
- wall time per round (results.json);
- the peak resident memory of each SuperNode's process tree (the SuperNode, its
  SuperExec and the ClientApp processes it starts), sampling /proc every 0.2 s;
- the bytes the SuperNode processes actually sent and received, TLS records and all,
  counted by a TCP relay they connect through, per round (between two checkpoints),
  against smallfed's own count of the round's bytes (``bytes_up``/``bytes_down``)
  and its wire estimate (``bytes_up_wire_est``/``bytes_down_wire_est``).
Writes benchmarks/results/deploy_loopback[-TAG].json.

    python benchmarks/deploy_loopback.py [--nodes 10] [--rounds 3] [--codec none]

``--fit RUN.json [RUN.json ...]`` solves the wire model's constants
(smallfed/flower/wire.py) from runs of this script, dense and compressed ones of
different round times: per direction, least squares of the steady rounds' (2 on)
measured bytes less payload on requests, payload and node-seconds (polling while a
round runs, which is slower than the idle rate measured after it); the join from
round 1's remainder, less the FAB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smallfed.cli import load_config  # noqa: E402
from smallfed.flower.wire import app_bundle_bytes  # noqa: E402
from tests.processes import descendants  # noqa: E402
from tests.test_deploy import (  # noqa: E402
    BIN,
    Processes,
    checkpointed,
    edge_command,
    federation_files,
    flwr_env,
    free_port,
    register,
    start_superlink,
)


def tree_rss_mb(root: int) -> dict[str, tuple[float, float]]:
    """Resident memory of ``root`` and all its descendants, in MB, by program name:
    (all resident pages, the anonymous ones). Anonymous pages are each process's own;
    the rest (shared libraries) the processes of one device partly share."""
    by_name: dict[str, tuple[float, float]] = {}
    for pid in descendants(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        # The program, not its interpreter: `python .../flower-supernode` is flower-supernode.
        name = next((Path(a.decode()).name for a in argv
                     if a and not Path(a.decode()).name.startswith("python")), "?")
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
              if line.startswith(("VmRSS:", "RssAnon:"))}
        was = by_name.get(name, (0.0, 0.0))
        by_name[name] = (was[0] + kb.get("VmRSS", 0) / 1024, was[1] + kb.get("RssAnon", 0) / 1024)
    return by_name


class CountingRelay:
    """A TCP relay on loopback that counts the bytes each way, for measuring only.

    The SuperNodes connect to it instead of to the SuperLink; it passes the (TLS) bytes
    through unread. smallfed never uses it: Flower's Fleet API (HTTPS) is the transport.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.up = self.down = 0  # node -> SuperLink, SuperLink -> node
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        if not ready.wait(30):
            raise TimeoutError("the relay did not start")

    def counts(self) -> tuple[int, int]:
        return self.up, self.down

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._connect, "127.0.0.1", self.port))
        ready.set()
        self._loop.run_forever()

    async def _connect(self, node_r: asyncio.StreamReader, node_w: asyncio.StreamWriter) -> None:
        try:
            link_r, link_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            node_w.close()
            return
        await asyncio.gather(self._pipe(node_r, link_w, up=True),
                             self._pipe(link_r, node_w, up=False))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--codec", default="none", help="the uplink codec (codec key)")
    parser.add_argument("--idle-s", type=float, default=20.0,
                        help="seconds of idle traffic (polls, heartbeats) measured after the run")
    parser.add_argument("--fit", nargs="+", metavar="RUN.json",
                        help="solve the wire model's constants from these results; no run")
    args = parser.parse_args()
    if args.fit:
        runs = {f: json.loads(Path(f).read_text()) for f in args.fit}
        constants = fit(list(runs.values()))
        print(json.dumps(constants, indent=2))
        for name, run in runs.items():  # in-sample: how well the model fits each round
            print(name, "estimate / measured, up:", check(run, constants, "up"), "down:",
                  check(run, constants, "down"))
        return
    tmp = Path(tempfile.mkdtemp(prefix="smallfed-deploy-"))
    cfg = load_config("simulations/mnist.toml", []).replace(num_clients=args.nodes,
                                                            clients_per_round=args.nodes)
    certs, keys = federation_files(tmp, cfg, args.nodes)
    port, home, out = free_port(), tmp / "flwr-home", tmp / "results"
    env = flwr_env(home, port, certs["ca.crt"])
    procs = Processes(env, tmp)
    flwr = str(BIN / "flwr")
    peaks: dict[int, float] = {}  # node -> peak of its whole tree
    anon_peaks: dict[int, float] = {}  # node -> peak of its tree's anonymous pages
    parts: dict[str, float] = {}  # program -> its peak in any node's tree
    wire: dict[int, tuple[int, int]] = {}  # round -> relay counts when it was checkpointed
    done = threading.Event()
    try:
        start_superlink(procs, tmp, port)
        relay = CountingRelay(port)
        for _, public in keys:
            register(env, public).check_returncode()
        nodes = [procs.start(f"sn{i}", edge_command(relay.port, keys[i][0], tmp / f"data{i}",
                                                    certs["ca.crt"]))
                 for i in range(args.nodes)]

        def sample() -> None:
            while not done.is_set():
                for i, node in enumerate(nodes):
                    by_name = tree_rss_mb(node.pid)
                    peaks[i] = max(peaks.get(i, 0.0), sum(t for t, _ in by_name.values()))
                    anon_peaks[i] = max(anon_peaks.get(i, 0.0),
                                        sum(a for _, a in by_name.values()))
                    for name, (mb, _) in by_name.items():
                        parts[name] = max(parts.get(name, 0.0), mb)
                counts = relay.counts()
                for r in range(-1, checkpointed(out) + 1):  # rounds ending within one sample
                    wire.setdefault(r, counts)
                done.wait(0.2)

        done.wait(10)  # the nodes connect and activate
        threading.Thread(target=sample, daemon=True).start()
        config = (f"num-server-rounds={args.rounds} num-clients={args.nodes} "
                  f"clients-per-round={args.nodes} dataset='mnist' codec='{args.codec}' "
                  f"data-dir='{ROOT.parent / 'shared/data/mnist'}' out-dir='{out}'")
        run = subprocess.run([flwr, "run", ".", "tls", "--stream", "--run-config", config],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode:
            raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
        for r in range(-1, args.rounds + 1):  # in case the sampler missed the last
            wire.setdefault(r, relay.counts())
        # Idle traffic after the run, when every node has surely connected (before it,
        # ten nodes starting on two cores may not have).
        idle_start = relay.counts()
        done.wait(args.idle_s)
        idle = [b - a for a, b in zip(idle_start, relay.counts())]
    finally:
        done.set()
        procs.stop_all(str(tmp))
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    if len(rounds) < args.rounds + 1:  # `flwr run` returns 0 when the ServerApp dies
        raise RuntimeError(f"the run stopped after round {len(rounds) - 1} of {args.rounds}: "
                           f"see the SuperLink's log in {tmp}")
    report = {
        "nodes": args.nodes,
        "codec": args.codec,
        "wall_time_per_round_s": [r["wall_time_s"] for r in results["rounds"][1:]],
        "clients_per_round": [r["clients"] for r in results["rounds"][1:]],
        "bytes_up_per_round": [r["bytes_up"] for r in results["rounds"][1:]],
        "bytes_down_per_round": [r["bytes_down"] for r in results["rounds"][1:]],
        "final_accuracy": results["summary"]["final_accuracy"],
        "peak_rss_mb_per_supernode": [round(peaks[i], 1) for i in sorted(peaks)],
        "peak_anon_rss_mb_per_supernode": [round(anon_peaks[i], 1) for i in sorted(anon_peaks)],
        "peak_rss_mb_by_program": {name: round(mb, 1) for name, mb in sorted(parts.items())
                                   if name != "?"},
        "idle_wire_bytes_per_s_all_nodes": [round(b / args.idle_s) for b in idle],
        # Round r's wire bytes: what crossed between checkpoints r-1 and r. Round 1 also
        # holds each node fetching the run and its app bundle (FAB), and discovery.
        "wire_bytes_up_per_round": [wire[r][0] - wire[r - 1][0] for r in range(1, args.rounds + 1)],
        "wire_bytes_down_per_round": [
            wire[r][1] - wire[r - 1][1] for r in range(1, args.rounds + 1)],
        "wire_over_counted_up": [round((wire[r][0] - wire[r - 1][0]) / rounds[r]["bytes_up"], 4)
                                 for r in range(1, args.rounds + 1)],
        "wire_over_counted_down": [
            round((wire[r][1] - wire[r - 1][1]) / rounds[r]["bytes_down"], 4)
            for r in range(1, args.rounds + 1)],
        # smallfed's wire estimate of each round (smallfed/flower/wire.py), and what it
        # was made from; est over measured: 1.0 is exact.
        "wire_est_up_per_round": [r["bytes_up_wire_est"] for r in rounds[1:]],
        "wire_est_down_per_round": [r["bytes_down_wire_est"] for r in rounds[1:]],
        "wire_est_over_measured_up": [
            round(rounds[r]["bytes_up_wire_est"] / (wire[r][0] - wire[r - 1][0]), 4)
            for r in range(1, args.rounds + 1)],
        "wire_est_over_measured_down": [
            round(rounds[r]["bytes_down_wire_est"] / (wire[r][1] - wire[r - 1][1]), 4)
            for r in range(1, args.rounds + 1)],
        "messages_per_round": [[r["messages_down"], r["messages_up"]] for r in rounds[1:]],
        "objects_per_round": [[r["objects_down"], r["objects_up"]] for r in rounds[1:]],
        "wire_model": results["summary"]["wire_model"],
    }
    print(json.dumps(report, indent=2))
    tag = "" if args.codec == "none" else "-" + "".join(c if c.isalnum() else "_" for c in args.codec)
    Path(f"benchmarks/results/deploy_loopback{tag}.json").write_text(
        json.dumps(report, indent=2) + "\n")


def fit(runs: list[dict]) -> dict[str, float]:
    """The wire model's constants from runs of this script (see the module's docstring)."""
    import numpy as np

    constants: dict[str, float] = {}
    for way in ("up", "down"):
        rows, joins = [], []
        for run in runs:
            nodes, seconds = run["nodes"], run["wall_time_per_round_s"]
            for i, wire in enumerate(run[f"wire_bytes_{way}_per_round"]):
                payload = run[f"bytes_{way}_per_round"][i]
                requests = sum(run["objects_per_round"][i]) + sum(run["messages_per_round"][i])
                row = (requests, payload, seconds[i] * nodes, wire - payload)
                (joins if i == 0 else rows).append((row, run))
        (request, framing, poll), *_ = np.linalg.lstsq(
            np.array([r[:3] for r, _ in rows], float), np.array([r[3] for r, _ in rows]),
            rcond=None)
        constants.update({f"request_{way}": round(request, 1), f"framing_{way}": round(framing, 4),
                          f"poll_{way}": round(poll, 1)})
        # Round 1's remainder beyond the model, per node: registering, and (down) the
        # FAB, whose own bytes the estimate counts apart (app_bundle_bytes).
        constants[f"join_{way}"] = round(max(0.0, float(np.mean(
            [(rest - request * q - framing * p - poll * t) / run["nodes"]
             - (run["wire_model"].get("fab_bytes", app_bundle_bytes()) if way == "down" else 0)
             for (q, p, t, rest), run in joins]))), 1)
    return constants


def check(run: dict, c: dict[str, float], way: str) -> list[float]:
    """Each round's wire estimate with constants ``c`` over what the relay measured."""
    out = []
    for i, wire in enumerate(run[f"wire_bytes_{way}_per_round"]):
        payload = run[f"bytes_{way}_per_round"][i]
        requests = sum(run["objects_per_round"][i]) + sum(run["messages_per_round"][i])
        est = (c[f"request_{way}"] * requests + (1 + c[f"framing_{way}"]) * payload
               + c[f"poll_{way}"] * run["wall_time_per_round_s"][i] * run["nodes"])
        if i == 0:  # round 1: every node joins
            fab = run["wire_model"].get("fab_bytes", app_bundle_bytes()) if way == "down" else 0
            est += run["nodes"] * (c[f"join_{way}"] + fab)
        out.append(round(float(est / wire), 3))
    return out


if __name__ == "__main__":
    main()
