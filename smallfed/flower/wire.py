"""What a round costs on the wire, estimated: the transport's overhead around the payload.

smallfed counts the bytes of the arrays it sends (``bytes_up``/``bytes_down``): the
payload, exact and independent of the transport. A deployed node sends more. Flower's
Fleet API moves a message as a tree of objects (the message, its record dict, each
record, each array and each array's chunk), one HTTPS request per object, each with
its headers and node-auth signature; nodes poll while they wait; and a node joining a
run fetches the run and its app bundle (FAB) once. The model:

    up   = request_up   x requests + (1 + framing_up)   x payload_up   + poll_up   x node-seconds
    down = request_down x requests + (1 + framing_down) x payload_down + poll_down x node-seconds
    requests = objects of every message + 1 per message (pull-confirm or push-messages)

plus ``join_up``/``join_down`` and the app bundle (FAB) the first time a node is sent
anything (the discovery query runs its ClientApp, which fetches the FAB: smallfed's
Python sources, stored uncompressed, about 720 KB today). Node-seconds are the round's
duration times the nodes connected (every SuperNode polls, sampled or not): its real
duration in a deployment, its simulated one with device simulation, and none in a
simulation without devices (whose own time says nothing of a deployment's): there
the estimate leaves polling out and is a lower bound. Identical arrays in one message
are one object to Flower (content-addressed) and one each here: at most a request
more each.

A device's time is charged the round trips too: Flower moves a message's objects a
few at a time (``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS``/``PUSHES``, 2 by default),
so a message takes ``ceil(objects / 2) + 1`` round trips.

The constants are measured by ``benchmarks/deploy_loopback.py`` (10 SuperNodes over
TLS through a byte-counting relay; ``--fit`` solves them from dense and compressed
runs of different round times) for the Flower version named in the model; re-measure
when Flower changes. Polling is the rate while a round runs, which is about half the
idle rate: a node busy with its ClientApp polls less.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.constant import (
    FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS,
    FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES,
)


@dataclass(frozen=True)
class WireModel:
    """Bytes a node's transport adds to the payload; see the module's docstring."""

    flwr_version: str
    request_up: float  # bytes sent per request: headers, node-auth signature, object id
    request_down: float  # bytes received per request: response headers and framing
    framing_up: float  # fraction of the payload added (protobuf, HTTP and TLS framing)
    framing_down: float
    poll_up: float  # bytes per second a connected node sends during a round (polls, heartbeats)
    poll_down: float
    join_up: float  # once per node and run: registering with the run and fetching the FAB,
    join_down: float  # besides the FAB's own bytes (app_bundle_bytes)
    source: str

    def overhead(self, objects: int, messages: int = 1) -> tuple[float, float]:
        """(down, up) bytes of the requests that move ``messages`` messages holding
        ``objects`` objects, in either direction: each request is sent and answered."""
        requests = objects + messages
        return self.request_down * requests, self.request_up * requests

    def down(self, payload: int, objects: int, messages: int = 1) -> tuple[float, float]:
        """(down, up) bytes of messages sent to a node holding ``payload`` array bytes."""
        down, up = self.overhead(objects, messages)
        return down + (1 + self.framing_down) * payload, up

    def up(self, payload: int, objects: int, messages: int = 1) -> tuple[float, float]:
        """(down, up) bytes of messages a node sends holding ``payload`` array bytes."""
        down, up = self.overhead(objects, messages)
        return down, up + (1 + self.framing_up) * payload

    @staticmethod
    def round_trips(objects: int, messages: int = 1, pulled: bool = True) -> int:
        """Round trips that move ``messages`` messages of ``objects`` objects: Flower
        pulls (to a node) or pushes (from it) a few objects at a time, and one more
        request per message pulls or pushes the message itself."""
        at_once = (FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS if pulled
                   else FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES)
        return math.ceil(objects / max(at_once, 1)) + messages

    def polling(self, node_seconds: float) -> tuple[float, float]:
        """(down, up) bytes of nodes waiting for ``node_seconds`` in all."""
        return self.poll_down * node_seconds, self.poll_up * node_seconds

    def block(self) -> dict[str, Any]:
        """results.json's ``wire_model``: the constants an estimate was made with."""
        return {**asdict(self), "fab_bytes": app_bundle_bytes()}


# Solved by `python benchmarks/deploy_loopback.py --fit
# benchmarks/results/deploy_loopback-{first,second}*.json`: 10 SuperNodes, TLS, node
# authentication; dense and top-k 1% uplinks, in two sessions with rounds of 50-125 s
# (the first runs' object counts added afterwards: see their "note"; the second runs'
# estimates were made with earlier constants). The top-k run without a session in its
# name is later, made with these constants: the check. Polling is the rate while a
# round runs, below the idle rate (about 357 B/s up and 186 down per node): a node
# busy with its ClientApp polls less.
FLOWER_1_42 = WireModel(
    flwr_version="1.42.0",
    request_up=1069.2, request_down=225.1, framing_up=0.0029, framing_down=0.0219,
    poll_up=158.8, poll_down=79.3, join_up=0.0, join_down=4767.0,
    source="benchmarks/deploy_loopback.py --fit, 10 SuperNodes over TLS on loopback",
)
MODEL = FLOWER_1_42

# pyproject.toml's fab-include, as (package, pattern): what `flwr build` puts in the FAB.
FAB_SOURCES = (("smallfed", "**/*.py"), ("clients", "*.py"), ("server", "*.py"))
# Per file in the FAB besides its bytes: zip headers, its manifest line and a share of
# pyproject.toml (flwr 1.42's FAB of 85 files was 721,899 bytes, 264 a file over them).
FAB_FILE_BYTES = 264


@functools.cache
def app_bundle_bytes() -> int:
    """About the size of the FAB each node fetches once a run: the app's sources, which
    Flower stores uncompressed. Counted from the installed packages, not built: the
    server may run where `flwr build` cannot."""
    total = 0
    for package, pattern in FAB_SOURCES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in Path(folder).glob(pattern):
                if "__pycache__" not in path.parts:
                    total += path.stat().st_size + FAB_FILE_BYTES
    return total


def message_objects(message: Message) -> int:
    """Flower objects a message travels as (one request each): the message itself and
    those of its content. An error reply is one."""
    return 1 if message.has_error() else 1 + content_objects(message.content)


def content_objects(content: RecordDict) -> int:
    """Flower objects of a record dict: itself, each record, each array and its chunks."""
    records = (len(content.array_records) + len(content.metric_records)
               + len(content.config_records))
    arrays = sum(1 + max(1, math.ceil(len(array.data) / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE))
                 for record in content.array_records.values() for array in record.values())
    return 1 + records + arrays
