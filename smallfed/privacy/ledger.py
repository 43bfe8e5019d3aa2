"""A device's privacy ledger: every DP-SGD round it has released, where a restart finds it.

The accountant can only compose what it is told. Flower 1.42 keeps a node's
``Context.state`` in the SuperNode's memory, so a restarted SuperNode would start its
accountant from zero and could spend its budget again. On a device (a node with a
``data-dir``) the ledger is a file in that folder, ``privacy-ledger.json``, written
atomically before the update leaves; it holds every round of every run that trained
on that data, since they all spend the same records' privacy. In simulation the ledger
lives in the node's state, which the run's checkpoint keeps.

The device refuses to train rather than start at zero when its ledger is corrupt (bad
JSON, fields or checksum), or missing or shorter while the node's state says it has
written more, or missing on a device with a privacy floor (``smallfed edge start``
creates the ledger of such a device when it first starts it). What the ledger cannot catch: the device's owner deleting the file and
restarting the SuperNode. The owner may waive their own data's privacy; the ledger
protects them from a curious server, not from themselves.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context

from smallfed.privacy.local_dp import History

LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 1
# Context.state keys: the history itself in simulation; on a device, how many entries
# this SuperNode has written to the file (the mark that it has trained).
STATE_HISTORY_KEY = "smallfed-dp-history"
STATE_WRITTEN_KEY = "smallfed-dp-ledger-written"


class LedgerError(RuntimeError):
    """The ledger cannot be trusted: the device must not train until it is restored."""


@dataclass
class Ledger:
    """The (noise multiplier, sample rate, steps) of every round this device released."""

    history: History = field(default_factory=list)
    path: Path | None = None  # None: kept in the node's state (simulation)
    entries: list[dict] = field(default_factory=list)  # the file's, on a device

    @classmethod
    def open(cls, context: Context, *, must_exist: bool = False) -> Ledger:
        """The node's ledger: its data folder's file on a device, its state in simulation.

        ``must_exist``: the device has a privacy floor, so ``smallfed edge start`` made its
        ledger; a missing file then means a lost one, in this run or any other.
        """
        data_dir = context.node_config.get("data-dir")
        if not data_dir:
            saved = context.state.get(STATE_HISTORY_KEY)
            if saved is None:
                return cls()
            return cls(list(zip(saved["noise"], saved["rate"], [int(s) for s in saved["steps"]])))
        path = Path(str(data_dir)) / LEDGER_FILE
        marker = context.state.get(STATE_WRITTEN_KEY)
        written = int(marker["entries"]) if marker is not None else 0
        if not path.exists():
            if written or must_exist:
                why = (f"this node has written {written} rounds to it" if written else
                       "this device has a privacy floor, and `smallfed edge start` made it")
                raise LedgerError(
                    f"{path} is missing, but {why}: refusing to train rather than restart "
                    "the privacy accountant at zero; restore the file from a backup")
            return cls(path=path)
        entries = read_entries(path)
        history = _history(entries)
        if len(history) < written:
            raise LedgerError(
                f"{path} holds {len(history)} rounds, but this node has written {written}: "
                "the file was rolled back; refusing to train until it is restored")
        return cls(history, path, entries)

    def add(self, context: Context, step: tuple[float, float, int], run_id: int) -> None:
        """Record a round that is about to be released: on disk (fsynced) before the reply."""
        self.history.append(step)
        if self.path is None:
            noise, rate, steps = zip(*self.history)
            context.state[STATE_HISTORY_KEY] = ConfigRecord(
                {"noise": list(noise), "rate": list(rate), "steps": list(steps)})
            return
        self.entries.append({"noise": step[0], "rate": step[1], "steps": step[2],
                             "run": run_id,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_entries(self.path, self.entries)
        context.state[STATE_WRITTEN_KEY] = ConfigRecord({"entries": len(self.entries)})


def create_ledger(data_dir: str | Path) -> bool:
    """Make an empty ledger in ``data_dir`` unless one is there; True if it made one."""
    path = Path(data_dir) / LEDGER_FILE
    if path.exists():
        return False
    write_entries(path, [])
    return True


def _checksum(entries: list[dict]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def write_entries(path: Path, entries: list[dict]) -> None:
    """Replace the ledger atomically: a crash leaves the old file or the new, never half."""
    text = json.dumps({"version": LEDGER_VERSION, "entries": entries,
                       "sha256": _checksum(entries)}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".privacy-ledger-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power loss
        finally:
            os.close(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def ledger_lock(context: Context) -> Iterator[None]:
    """Hold the device's ledger from the budget check to the write: two train messages
    (two runs) at once would otherwise both pass the check on the same history."""
    data_dir = context.node_config.get("data-dir")
    if not data_dir:
        yield
        return
    with open(Path(str(data_dir)) / ".privacy-ledger.lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_entries(path: Path) -> list[dict]:
    """The ledger's entries; LedgerError if the file is not one this module wrote whole."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
        ok = data.get("version") == LEDGER_VERSION and data.get("sha256") == _checksum(entries)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerError(f"{path} cannot be read ({err}): refusing to train until the "
                          "privacy ledger is restored") from err
    if not ok or not all(_valid(e) for e in entries):
        raise LedgerError(f"{path} is corrupt (version, checksum or fields): refusing to "
                          "train until the privacy ledger is restored")
    return entries


def read_ledger(path: Path) -> History:
    return _history(read_entries(path))


def _history(entries: list[dict]) -> History:
    return [(float(e["noise"]), float(e["rate"]), int(e["steps"])) for e in entries]


def _valid(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    noise, rate, steps = entry.get("noise"), entry.get("rate"), entry.get("steps")
    return (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0
            and isinstance(rate, (int, float)) and 0 < rate <= 1
            and isinstance(steps, int) and steps > 0)
