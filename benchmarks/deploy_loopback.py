"""A deployed federation on loopback: 10 SuperNodes over TLS with node authentication.

The SuperLink and 10 SuperNodes (`smallfed deploy superlink`, `smallfed edge start`,
each with its own MNIST partition) run 3 rounds of cnn-tiny through `flwr run`. The
script records wall time per round (results.json) and, sampling /proc every 0.2 s,
the peak resident memory of each SuperNode's process tree (the SuperNode, its
SuperExec and the ClientApp processes it starts). Writes
benchmarks/results/deploy_loopback.json.

    python benchmarks/deploy_loopback.py [--nodes 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smallfed.cli import load_config  # noqa: E402
from smallfed.data import write_device_data  # noqa: E402
from smallfed.deploy.certs import make_certificates, make_node_key  # noqa: E402
from tests.test_deploy import (  # noqa: E402
    BIN,
    Processes,
    flwr_env,
    free_port,
    start_superlink,
)


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = next((int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("VmRSS:")), 0)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smallfed-deploy-"))
    cfg = load_config("simulations/mnist.toml", []).replace(num_clients=args.nodes,
                                                            clients_per_round=args.nodes)
    certs = make_certificates(tmp / "certs", ["127.0.0.1"])
    keys = [make_node_key(tmp / "keys", f"node{i}") for i in range(args.nodes)]
    for i in range(args.nodes):
        write_device_data(cfg, i, tmp / f"data{i}")
    port, home, out = free_port(), tmp / "flwr-home", tmp / "results"
    env = flwr_env(home, port, certs["ca.crt"])
    procs = Processes(env, tmp)
    smallfed, flwr = str(BIN / "smallfed"), str(BIN / "flwr")
    peaks: dict[int, float] = {}
    done = threading.Event()
    try:
        start_superlink(procs, tmp, port)
        for _, public in keys:
            subprocess.run([flwr, "supernode", "register", str(public), "tls"], env=env,
                           capture_output=True, timeout=60, check=True)
        nodes = [procs.start(f"sn{i}", [
            smallfed, "edge", "start", "--superlink", f"127.0.0.1:{port}", "--data-dir",
            str(tmp / f"data{i}"), "--root-cert", str(certs["ca.crt"]), "--auth-key",
            str(keys[i][0]), "--port", str(free_port())]) for i in range(args.nodes)]

        def sample() -> None:
            while not done.is_set():
                for i, node in enumerate(nodes):
                    peaks[i] = max(peaks.get(i, 0.0), tree_rss_mb(node.pid))
                done.wait(0.2)

        threading.Thread(target=sample, daemon=True).start()
        config = (f"num-server-rounds={args.rounds} num-clients={args.nodes} "
                  f"clients-per-round={args.nodes} dataset='mnist' "
                  f"data-dir='{ROOT.parent / 'shared/data/mnist'}' out-dir='{out}'")
        run = subprocess.run([flwr, "run", ".", "tls", "--stream", "--run-config", config],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode:
            raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
    finally:
        done.set()
        procs.stop_all(str(tmp))
    results = json.loads((out / "results.json").read_text())
    report = {
        "nodes": args.nodes,
        "wall_time_per_round_s": [r["wall_time_s"] for r in results["rounds"][1:]],
        "clients_per_round": [r["clients"] for r in results["rounds"][1:]],
        "bytes_up_per_round": [r["bytes_up"] for r in results["rounds"][1:]],
        "bytes_down_per_round": [r["bytes_down"] for r in results["rounds"][1:]],
        "final_accuracy": results["summary"]["final_accuracy"],
        "peak_rss_mb_per_supernode": [round(peaks[i], 1) for i in sorted(peaks)],
    }
    print(json.dumps(report, indent=2))
    Path("benchmarks/results/deploy_loopback.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
