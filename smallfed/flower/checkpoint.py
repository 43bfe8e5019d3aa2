"""Checkpoints: what a run needs to go on after a round, saved every round.

``<run folder>/checkpoint/`` holds

* ``state.json``: the last finished round, the configuration, the recorded rounds and
  the state of every server layer (:func:`smallfed.flower.layers.stack_state`: the
  epsilons clients reported, the user-level DP accountant's history and clip, the
  inner strategy's momentum or moments), with each array of it replaced by a
  reference into ``arrays.npz``;
* ``arrays.npz``: the global model (``global/<name>``) and the layers' arrays
  (``server/<n>``), as exact copies;
* ``clients.npz``: each simulated node's ``Context.state`` (error-feedback residuals,
  the DP-SGD accountant's history), one Flower-serialized RecordDict per partition id.

The folder is written as ``checkpoint.tmp`` and then renamed, so a run stopped while
writing keeps its previous checkpoint whole. Sampling, client seeds and reproducible
DP noise are functions of ``(seed, round)``, so a resumed run repeats what the
uninterrupted run would have done.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from flwr.supercore import log
from google.protobuf.message import DecodeError

from smallfed.codec import parse_codec
from smallfed.config import RUNNING_KEYS, Config, ConfigError

CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 2
ARRAY_REF = "__array__"  # {"__array__": "server/3"}: an array of the layers' state

Arrays = dict[str, np.ndarray]


@dataclass
class Checkpoint:
    """A run after ``round`` rounds."""

    round: int
    config: dict[str, Any]
    global_arrays: Arrays
    server: dict[str, Any] = field(default_factory=dict)  # recorder, layers (JSON + arrays)
    clients: dict[int, RecordDict] = field(default_factory=dict)  # partition -> state


def split_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` with every numpy array moved into ``arrays`` and replaced by a reference."""
    if isinstance(value, np.ndarray):
        key = f"server/{len(arrays)}"
        arrays[key] = value
        return {ARRAY_REF: key}
    if isinstance(value, dict):
        return {k: split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_arrays(v, arrays) for v in value]
    return value


def join_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Undo :func:`split_arrays`."""
    if isinstance(value, dict):
        if set(value) == {ARRAY_REF}:
            return arrays[value[ARRAY_REF]]
        return {k: join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [join_arrays(v, arrays) for v in value]
    return value


def save(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``out_dir/checkpoint`` atomically; return that folder."""
    final = Path(out_dir) / CHECKPOINT_DIR
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {f"global/{k}": v for k, v in ckpt.global_arrays.items()}
    server = split_arrays(ckpt.server, arrays)
    np.savez(tmp / "arrays.npz", **arrays)
    np.savez(tmp / "clients.npz", **{
        str(pid): np.frombuffer(recorddict_to_proto(state).SerializeToString(), dtype=np.uint8)
        for pid, state in ckpt.clients.items()})
    state = {"format": FORMAT_VERSION, "round": ckpt.round, "config": ckpt.config,
             "server": server}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left by a stop during the last cleanup
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def require(run_dir: str | Path) -> Path:
    """The folder of a run folder's checkpoint, without reading it; ConfigError if none.

    A run stopped between :func:`save`'s two renames left only ``checkpoint.old``,
    the previous checkpoint, whole: that one it is.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "state.json").is_file():
        folder = folder.with_name(CHECKPOINT_DIR + ".old")
    if not (folder / "state.json").is_file():
        raise ConfigError(f"{run_dir}: no checkpoint ({Path(run_dir) / CHECKPOINT_DIR}/state.json "
                          "is missing); name the folder of a run that `smallfed simulate` wrote")
    return folder


def load(run_dir: str | Path) -> Checkpoint:
    """The checkpoint of a run folder (see :func:`require`); ConfigError if there is none
    or it is unreadable."""
    folder = require(run_dir)
    try:
        return _read(folder)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DecodeError) as err:
        raise ConfigError(f"{folder}: the checkpoint is unreadable ({err})") from err


def _read(folder: Path) -> Checkpoint:
    state = json.loads((folder / "state.json").read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{folder}: checkpoint format {state.get('format')!r}, this smallfed "
                          f"reads format {FORMAT_VERSION}; finish that run with the smallfed "
                          "version that started it, or start it again")
    with np.load(folder / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    clients = {}
    with np.load(folder / "clients.npz") as npz:
        for pid in npz.files:
            proto = RecordDictProto()
            proto.ParseFromString(npz[pid].tobytes())
            clients[int(pid)] = recorddict_from_proto(proto)
    return Checkpoint(
        round=int(state["round"]), config=state["config"],
        global_arrays={k[len("global/"):]: v for k, v in arrays.items() if k.startswith("global/")},
        server=join_arrays(state["server"], arrays), clients=clients,
    )


# How long a run waits for another to stop writing to its out-dir: a ServerApp stopped
# with `flwr stop` learns of it at its next heartbeat (Flower: about every 20 s).
LOCK_WAIT_S = 120.0
_HELD: set[Path] = set()  # out-dirs this process holds (a simulation and its ServerApp)


@contextmanager
def out_dir_lock(out: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``out/.lock`` so that one run at a time writes results and checkpoints there:
    a run restarted with ``resume = true`` right after a stop waits for the stopped
    ServerApp to exit, then reads its last checkpoint. Re-entrant within a process."""
    key = out.resolve()
    if key in _HELD:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with open(out / ".lock", "w", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(INFO, "smallfed: waiting for another run to finish with %s", out)
            while True:
                time.sleep(1.0)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"out-dir {out}: another run has been writing there for "
                            f"{wait_s:.0f} s (it holds {out / '.lock'}); stop it, or choose "
                            "another out-dir") from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_resumable(cfg: Config, ckpt: Checkpoint, clients_saved: bool | None = None) -> None:
    """Fail before any work when ``cfg`` is not the configuration the checkpoint ran, or
    when DP-SGD's accountants on the clients would be lost (``clients_saved``: the engine
    let us save the clients' state; default: only in-process). Lost error-feedback
    residuals only warn."""
    try:  # a key added to smallfed since the checkpoint reads as its default
        saved = Config.from_mapping(ckpt.config).to_dict()
    except ConfigError as err:
        raise ConfigError(f"the checkpoint's configuration no longer loads: {err}") from err
    given = cfg.to_dict()
    differ = sorted(k for k in set(given) | set(saved)
                    if k not in RUNNING_KEYS and given.get(k) != saved.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {given.get(k)!r} given"
                            for k in differ[:5])
        raise ConfigError(f"cannot resume with a different configuration ({changes}); resume "
                          "without --config/--set to use the checkpoint's own")
    if clients_saved is None:  # in-process runs save it, from the first round on
        clients_saved = cfg.backend == "inprocess" and (bool(ckpt.clients) or ckpt.round == 0)
    if clients_saved:
        return
    if cfg.privacy == "sample":
        raise ConfigError("DP-SGD's privacy accountants live on the clients (Ray's actors, or "
                          "devices) and are not in this checkpoint: a resumed run would "
                          "restart them and spend the privacy budget again; start a new run "
                          "in another out-dir (in-process simulations resume fully)")
    if parse_codec(cfg.codec).error_feedback:
        # Losing a residual drops, once, the part of past updates not yet sent: error
        # feedback goes on from zero as at the start, so the run may go on.
        log(WARNING, "smallfed: error-feedback residuals live on the clients and are not "
            "checkpointed; they restart from zero in the resumed run")
