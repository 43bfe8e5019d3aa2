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
from tests.test_deploy import (  # noqa: E402
    BIN,
    Processes,
    edge_command,
    federation_files,
    flwr_env,
    free_port,
    register,
    start_superlink,
)


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
    certs, keys = federation_files(tmp, Config(num_clients=2, clients_per_round=2), 2)
    port, out = free_port(), tmp / "results"
    env = flwr_env(tmp / "flwr-home", port, certs["ca.crt"])
    server = Processes(env, tmp)
    device = Processes(dict(env, PATH=f"{edge_bin}{os.pathsep}/usr/bin:/bin"), tmp)
    try:
        start_superlink(server, tmp, port)
        for i, (private, public) in enumerate(keys):
            register(env, public).check_returncode()
            device.start(f"device{i}", edge_command(port, private, tmp / f"data{i}",
                                                    certs["ca.crt"], edge_bin / "smallfed"))
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
