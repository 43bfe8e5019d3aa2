"""smallfed's cache on disk: results that are slow to compute and fixed by their inputs
(DP noise calibrations, data splits), kept across runs, sweep points and processes.

The folder is ``SMALLFED_CACHE_DIR``, else ``$XDG_CACHE_HOME/smallfed``, else
``~/.cache/smallfed``; deleting it only costs the time to compute the results again.
Each entry is one file named by the hash of its key, and holds the key, so a reader
checks it has what it asked for.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from logging import WARNING
from pathlib import Path

from flwr.supercore import log

_warned: set[str] = set()  # kinds of entry whose folder could not be written


def cache_dir() -> Path:
    """``SMALLFED_CACHE_DIR``, else ``$XDG_CACHE_HOME/smallfed``, else ``~/.cache/smallfed``."""
    if folder := os.environ.get("SMALLFED_CACHE_DIR"):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smallfed"


def entry_path(kind: str, key: str, suffix: str) -> Path:
    """Where the entry of ``kind`` for ``key`` lives."""
    return cache_dir() / kind / f"{hashlib.sha256(key.encode()).hexdigest()}{suffix}"


def write_atomic(path: Path, data: bytes, what: str) -> None:
    """Write atomically (a temporary file in the same folder, then a rename), so
    processes that compute at once never read half a file. A cache that cannot be
    written is not an error: warn once per kind of entry (``what``) and go on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from others sharing the folder
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        if what not in _warned:
            _warned.add(what)
            log(WARNING, "smallfed: cannot cache %s in %s (%s); each process will compute "
                "them again. Set SMALLFED_CACHE_DIR to a writable folder", what,
                path.parent, err)
