"""Does a device-only install run a smallfed client? A check run by hand, not a test.

Makes a virtual environment with only what clients/README.md installs on a device
(torch, clients/requirements-edge.txt, smallfed with --no-deps), starts two
SuperNodes from it (`smallfed edge start`, TLS, node keys) against a SuperLink from
this environment, and runs 2 compressed rounds with `flwr run`. The device
environment's PATH holds nothing else, so its ClientApps run with its packages only.

    python benchmarks/edge_install.py [--venv DIR] [--torch-index-url URL]

Give ``--torch-index-url https://download.pytorch.org/whl/cpu`` (as clients/README.md
does) where pip's default index would pick torch's CUDA build; on the machine these
results come from, pip resolves torch==2.13.0 to its CPU wheel without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smallfed.config import Config  # noqa: E402
from smallfed.data import write_device_data  # noqa: E402
from smallfed.deploy.certs import make_certificates, make_node_key  # noqa: E402
from tests.test_deploy import BIN, Processes, flwr_env, free_port, start_superlink  # noqa: E402


def device_venv(venv: Path, torch_index: str | None) -> Path:
    """The device's environment, made once: returns its bin folder."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not (venv / "bin" / "smallfed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        index = ["--index-url", torch_index] if torch_index else []
        subprocess.run([*pip, "torch==2.13.0", *index], check=True)
        subprocess.run([*pip, "-r", str(ROOT / "clients" / "requirements-edge.txt")], check=True)
        subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    return venv / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "smallfed-edge-venv")
    parser.add_argument("--torch-index-url", default=None)
    args = parser.parse_args()
    edge_bin = device_venv(args.venv, args.torch_index_url)
    listed = subprocess.run([str(edge_bin / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    packages = sorted(p["name"].lower() for p in json.loads(listed.stdout))
    tmp = Path(tempfile.mkdtemp(prefix="smallfed-edge-"))
    certs = make_certificates(tmp / "certs", ["127.0.0.1"])
    keys = [make_node_key(tmp / "keys", f"node{i}") for i in range(2)]
    for i in range(2):
        write_device_data(Config(num_clients=2, clients_per_round=2), i, tmp / f"data{i}")
    port, out = free_port(), tmp / "results"
    env = flwr_env(tmp / "flwr-home", port, certs["ca.crt"])
    server = Processes(env, tmp)
    device = Processes(dict(env, PATH=f"{edge_bin}{os.pathsep}/usr/bin:/bin"), tmp)
    try:
        start_superlink(server, tmp, port)
        for _, public in keys:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "tls"],
                           env=env, capture_output=True, timeout=60, check=True)
        for i in range(2):
            device.start(f"device{i}", [
                str(edge_bin / "smallfed"), "edge", "start", "--superlink", f"127.0.0.1:{port}",
                "--data-dir", str(tmp / f"data{i}"), "--profile", "rpi4", "--root-cert",
                str(certs["ca.crt"]), "--auth-key", str(keys[i][0]), "--port", str(free_port())])
        config = ("num-server-rounds=2 num-clients=2 clients-per-round=2 "
                  f"codec='topk:0.1,quantize:4,error_feedback' out-dir='{out}'")
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "tls", "--stream", "--run-config",
                              config], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        if run.returncode:
            raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
    finally:
        server.stop_all(str(tmp))
        device.stop_all(str(tmp))
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    print(json.dumps({"device_packages": packages,
                      "rounds": [(r["round"], r["clients"], round(r["accuracy"], 4))
                                 for r in rounds]}, indent=1))
    if [r["clients"] for r in rounds] != [0, 2, 2]:
        raise SystemExit("the device-only SuperNodes did not both train in both rounds")


if __name__ == "__main__":
    main()
