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

plus ``join_up``/``join_down`` the first time a node is sent anything. Node-seconds
are the round's duration times the nodes sent a message that round: its real
duration in a deployment, its simulated one with device simulation, and none in a
simulation without devices (whose own time says nothing of a deployment's): there
the estimate leaves polling out and is a lower bound.

The constants are measured by ``benchmarks/deploy_loopback.py`` (10 SuperNodes over
TLS through a byte-counting relay; ``--fit`` solves them from a dense and a compressed
run) for the Flower version named in the model; re-measure when Flower changes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flwr.app import Message
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


@dataclass(frozen=True)
class WireModel:
    """Bytes a node's transport adds to the payload; see the module's docstring."""

    flwr_version: str
    request_up: float  # bytes sent per request: headers, node-auth signature, object id
    request_down: float  # bytes received per request: response headers and framing
    framing_up: float  # fraction of the payload added (protobuf, HTTP and TLS framing)
    framing_down: float
    poll_up: float  # bytes per second a connected node sends while it waits (polls, heartbeats)
    poll_down: float
    join_up: float  # once per node and run: registering with the run, fetching the FAB
    join_down: float
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

    def polling(self, node_seconds: float) -> tuple[float, float]:
        """(down, up) bytes of nodes waiting for ``node_seconds`` in all."""
        return self.poll_down * node_seconds, self.poll_up * node_seconds

    def block(self) -> dict[str, Any]:
        """results.json's ``wire_model``: the constants an estimate was made with."""
        return asdict(self)


# Solved by `python benchmarks/deploy_loopback.py --fit` from its dense and top-k runs
# (benchmarks/results/deploy_loopback*.json; 10 SuperNodes, TLS, node authentication).
FLOWER_1_42 = WireModel(
    flwr_version="1.42.0",
    request_up=753.0, request_down=211.2, framing_up=0.0175, framing_down=0.0087,
    poll_up=357.0, poll_down=186.0, join_up=0.0, join_down=284_400.0,
    source="benchmarks/deploy_loopback.py, 10 SuperNodes over TLS on loopback",
)
MODEL = FLOWER_1_42


def message_objects(message: Message) -> int:
    """Flower objects a message travels as (one request each): the message, its record
    dict, each record, each array and each array's chunks. An error reply is one."""
    if message.has_error():
        return 1
    content = message.content
    records = (len(content.array_records) + len(content.metric_records)
               + len(content.config_records))
    arrays = sum(1 + max(1, math.ceil(len(array.data) / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE))
                 for record in content.array_records.values() for array in record.values())
    return 2 + records + arrays
