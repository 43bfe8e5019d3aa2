"""Start Flower's Deployment Engine for smallfed: a SuperLink, and a SuperNode a device.

These build the ``flower-superlink`` / ``flower-supernode`` command lines with TLS and
node authentication on and runtime dependency installation off, check what can be
checked before connecting, and hand the process over to Flower (``exec``), so a
service manager (systemd) sees Flower's own process. Flower 1.42 serves every API of
the SuperLink (Fleet, Control, Runtime) over HTTPS on one port.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from smallfed.config import Config, ConfigError
from smallfed.devices import PROFILES, training_memory_bytes
from smallfed.models import build_model

INSECURE_WARNING = ("WARNING: --insecure: the SuperLink will talk plain HTTP. Model "
                    "updates and node identities cross the network unencrypted and anyone "
                    "can join. Use it only on a closed test network.")


def flower_binary(name: str) -> str:
    """Flower's console script, next to this Python first (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found; install flwr in this environment")
    return found


def superlink_command(certs: str | Path | None, host: str = "0.0.0.0", port: int = 8000,
                      database: str | Path = "superlink.db", insecure: bool = False
                      ) -> list[str]:
    """flower-superlink with TLS from ``certs`` (make_certificates' files) and node auth."""
    command = [flower_binary("flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(database), "--disable-runtime-dependency-installation"]
    if insecure:
        return [*command, "--insecure"]
    if certs is None:
        raise ConfigError("--certs: give the folder of `smallfed deploy certs`, or --insecure")
    folder = Path(certs)
    files = [folder / n for n in ("ca.crt", "server.pem", "server.key")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"--certs {folder}: missing {', '.join(missing)}; make them with "
                          "`smallfed deploy certs`")
    return [*command, "--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1]),
            "--ssl-keyfile", str(files[2]), "--enable-supernode-auth"]


def check_device(data_dir: str | Path, profile: str, model: str, batch_size: int) -> str:
    """What this device will train on, or ConfigError saying what is wrong with it."""
    data = Path(data_dir) / "data.npz"
    if not data.is_file():
        raise ConfigError(f"--data-dir {data_dir}: no data.npz (arrays x: N,C,H,W float32 and "
                          "y: N labels); smallfed.data.write_device_data writes one")
    try:
        with np.load(data, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"{data}: unreadable, or without arrays x and y ({err})") from err
    if x.ndim != 4 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"{data}: x has shape {x.shape} and y {y.shape}; expected x (N, C, H, "
                          "W) and y (N,) with N > 0")
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise ConfigError(f"{data}: labels y must be whole numbers >= 0, got {y.dtype} "
                          f"from {y.min()} to {y.max()}")
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile!r}: not one of {', '.join(PROFILES)}")
    cfg = Config(model=model, batch_size=batch_size)
    try:
        net = build_model(model, tuple(x.shape[1:]), int(y.max()) + 1, 0)
        need = training_memory_bytes(net, tuple(x.shape[1:]), cfg)
    except (ValueError, RuntimeError) as err:  # unknown model, or images it cannot take
        raise ConfigError(f"--model {model}: cannot train on {tuple(x.shape[1:])} images "
                          f"({err})") from err
    allowed = PROFILES[profile].memory_bytes
    if need > allowed:
        raise ConfigError(f"training {model} (batch {batch_size}) needs {need / 2**20:.1f} MiB, "
                          f"profile {profile} allows {allowed / 2**20:.1f} MiB")
    return (f"{len(y)} samples of shape {tuple(x.shape[1:])}; {model} needs "
            f"{need / 2**20:.1f} of {allowed / 2**20:.0f} MiB")


def privacy_floor(max_epsilon: float | None, min_noise: float | None,
                  max_delta: float | None, records: int | None) -> dict[str, float]:
    """The node config of this device's privacy floor; ConfigError on nonsense."""
    from smallfed.privacy.floor import DeviceFloor  # pylint: disable=import-outside-toplevel

    values = {key: value for key, value in (
        ("dp-max-epsilon", max_epsilon), ("dp-min-noise", min_noise),
        ("dp-max-delta", max_delta)) if value is not None}
    try:
        DeviceFloor.of(values)
    except ValueError as err:
        raise ConfigError(str(err).replace("node config ", "--").split(";")[0]) from err
    if records is not None:
        if records <= 0:
            raise ConfigError(f"--dp-records {records}: must be a positive count")
        values["dp-records"] = int(records)
    return values


def default_records(data_dir: str | Path) -> int:
    """The dp-records a device declares unless told: its count now, up to a power of two.

    Fixed in the node config when the SuperNode starts, so later rounds do not move
    with the data; the server learns the order of magnitude once.
    """
    with np.load(Path(data_dir) / "data.npz", allow_pickle=False) as npz:
        return 1 << max(0, len(npz["y"]) - 1).bit_length()


def ledger_summary(data_dir: str | Path, floor: bool) -> str:
    """What the device's privacy ledger holds (made empty first for a device with a
    privacy ``floor``, whose ClientApp then requires it); ConfigError if it is corrupt."""
    from smallfed.privacy.ledger import LEDGER_FILE, LedgerError, create_ledger, read_ledger

    path = Path(data_dir) / LEDGER_FILE
    if floor and create_ledger(data_dir):
        return f"privacy ledger {path}: created empty (from now on it must stay)"
    if not path.exists():
        return "no privacy ledger yet (this data has not trained under DP)"
    try:
        history = read_ledger(path)
    except LedgerError as err:
        raise ConfigError(str(err)) from err
    return f"privacy ledger {path}: {len(history)} private rounds recorded"


# Peak resident memory of one SuperNode's process tree (SuperNode, SuperExec, ClientApp)
# training cnn-tiny, in MB: benchmarks/deploy_loopback.py, BENCHMARKS.md. The three
# processes' VmRSS summed on x86 (shared pages counted in each): a cautious figure.
SUPERNODE_PEAK_MB = 680


def memory_warning(meminfo: str | Path = "/proc/meminfo") -> str:
    """A warning when this machine has less memory available than a SuperNode took at
    its peak in the benchmark, or '' (also where /proc/meminfo cannot be read)."""
    try:
        fields = {line.split(":")[0]: line.split()[1]
                  for line in Path(meminfo).read_text().splitlines() if ":" in line}
        available_mb = int(fields["MemAvailable"]) // 1024
    except (OSError, KeyError, ValueError, IndexError):
        return ""
    if available_mb >= SUPERNODE_PEAK_MB:
        return ""
    return (f"only {available_mb} MB of memory is available; a SuperNode training cnn-tiny "
            f"took up to {SUPERNODE_PEAK_MB} MB in smallfed's benchmark (BENCHMARKS.md). "
            "Stop other services, or expect the kernel to kill it mid-round")


def supernode_command(superlink: str, data_dir: str | Path, profile: str,
                      root_cert: str | Path | None, auth_key: str | Path | None,
                      port: int = 9094, insecure: bool = False,
                      privacy: dict[str, float] | None = None) -> list[str]:
    """flower-supernode for one device: its data folder, profile and privacy floor
    (``privacy``: node config keys of :mod:`smallfed.privacy.floor`, and ``dp-records``)
    in its node config."""
    node_config = f"data-dir='{Path(data_dir).resolve()}' device='{profile}'"
    for key, value in (privacy or {}).items():
        node_config += f" {key}={value!r}"
    command = [flower_binary("flower-supernode"), "--superlink", superlink,
               "--node-config", node_config, "--port", str(port)]
    if insecure:
        return [*command, "--insecure"]
    for flag, path in (("--root-cert", root_cert), ("--auth-key", auth_key)):
        if path is None or not Path(path).is_file():
            raise ConfigError(f"{flag}: give an existing file ({path}); or --insecure")
    return [*command, "--root-certificates", str(root_cert),
            "--auth-supernode-private-key", str(auth_key)]


def exec_command(command: list[str]) -> None:
    """Become the Flower process (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
