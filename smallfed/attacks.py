"""Hostile but authenticated clients, for robustness research and tests.

An :class:`AttackGrid` wraps any Grid (the in-process one, Ray's, a SuperLink's) and,
each round, rewrites the train replies of some of the nodes that were sent a train
message: a real client trained honestly, then its reply was changed on its way to the
server. The server code that receives it is the real one, layers and all::

    grid = AttackGrid(InProcessGrid(client_app, 100, cfg.to_dict()), "scale:1e6",
                      attackers_per_round=1, seed=cfg.seed)
    build_server_app(cfg, out)(grid, grid.server_context())

An attack is a small named function (:data:`ATTACKS`, ``@register_attack``); a spec
names it and its argument: ``scale:1e6``, ``signflip:10``, ``examples:1e9``,
``float64``, ``shape``, ``scalar``, ``duplicate:5``, ``oversize:1GiB``, ``nan``.

Who attacks: each round, ``attackers_per_round`` of the nodes sent a train message,
drawn with a generator seeded by ``(seed, round)`` from those nodes in partition
order. The partition ids are read off the replies to the server's own partition
queries as they pass through this Grid, so the same seed picks the same partitions
in every run although node ids are random; a node that reported none ranks by its
node id. An attacker is thus "sampled every round"; the draw never adds a node the
server did not choose.

What an attack may rewrite: every attack works on dense replies (codec ``none``);
``scale``, ``signflip``, ``examples``, ``duplicate`` and ``oversize`` also work on
codec payloads (``scale`` decodes the payload's delta with the run's codec, scales it
and re-encodes it with the same codec). The others are lies about dense arrays that a
codec payload cannot tell (its decoder checks its own header); they refuse a payload.
Pruning (masks in the train message) and an encoded broadcast (``codec-down``) are
not supported by the payload-rewriting attacks: they raise :class:`AttackError`.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from smallfed.codec import Chain, encoding_seed, parse_codec
from smallfed.flower.grids import ForwardingGrid
from smallfed.flower.layers.sampling import reported_partition
from smallfed.flower.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PAYLOAD_STYPE,
    arrays_record,
    message_array_bytes,
    payload_record,
    record_arrays,
    record_payload,
)

NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: data are np.save's bytes
PADDING_KEY = "padding"  # the extra array of the oversize attack


class AttackError(ValueError):
    """An attack spec that does not parse, or a reply an attack cannot rewrite."""


@dataclass
class Target:
    """One attacker's reply, with what it needs to be rewritten."""

    reply: Message  # the honest reply of the attacking node (rewritten in place)
    sent: Message  # the train message it answers: its arrays are the global model
    server_round: int
    codec: Chain  # the run's uplink codec (an identity chain: dense replies)
    cache: dict  # kept by the grid across rounds (the oversize attack's buffer)

    @property
    def encoded(self) -> bool:
        """Does the reply carry a codec payload rather than dense arrays?"""
        return any(a.stype == PAYLOAD_STYPE for a in self.reply.content[ARRAYS_KEY].values())

    def global_model(self) -> dict[str, np.ndarray]:
        """The model the attacker was sent (dense only: no codec-down, no pruning)."""
        record = self.sent.content[ARRAYS_KEY]
        if any(a.stype == PAYLOAD_STYPE for a in record.values()):
            raise AttackError("the broadcast is encoded (codec-down): the attacks that need "
                              "the global model do not decode it")
        if len(self.sent.content.array_records) > 1:
            raise AttackError("the train message carries pruning masks: the attacks that "
                              "rewrite an update do not support pruning")
        return record_arrays(record)


# (target, argument) -> the replies delivered instead of the honest one
AttackFn = Callable[[Target, float], "Message | list[Message]"]


@dataclass(frozen=True)
class AttackEntry:
    name: str
    fn: AttackFn
    doc: str
    needs_arg: bool
    payloads: bool  # also rewrites codec payloads


ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, *, needs_arg: bool = False,
                    payloads: bool = False) -> Callable[[AttackFn], AttackFn]:
    """Add an attack ``fn(target, arg)`` under ``name``; its docstring says what it models."""

    def add(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = AttackEntry(name, fn, (fn.__doc__ or "").strip().splitlines()[0],
                                    needs_arg, payloads)
        return fn

    return add


@dataclass(frozen=True)
class Attack:
    """A parsed spec: the registered attack and its argument."""

    spec: str
    entry: AttackEntry
    arg: float = 0.0

    def __call__(self, target: Target) -> list[Message]:
        if target.encoded and not self.entry.payloads:
            raise AttackError(f"{self.spec}: rewrites dense arrays; this reply carries a "
                              f"codec payload (use codec 'none')")
        out = self.entry.fn(target, self.arg)
        return out if isinstance(out, list) else [out]


_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_number(text: str) -> float:
    """A float, or a byte size with a unit: ``1e9``, ``1.7e308``, ``1GiB``, ``256MiB``."""
    match = re.fullmatch(r"\s*([-+0-9.eE]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZES:
        raise ValueError(text)
    return float(match.group(1)) * _SIZES[match.group(2).lower()]


def parse_attack(spec: str | Attack) -> Attack:
    """``name`` or ``name:arg`` -> :class:`Attack`; AttackError naming the known ones."""
    if isinstance(spec, Attack):
        return spec
    name, _, arg = spec.strip().partition(":")
    entry = ATTACKS.get(name)
    if entry is None:
        raise AttackError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    if entry.needs_arg and not arg:
        raise AttackError(f"attack {name!r} needs an argument: {name}:VALUE")
    if not entry.needs_arg and arg:
        raise AttackError(f"attack {name!r} takes no argument, got {arg!r}")
    try:
        value = parse_number(arg) if arg else 0.0
    except ValueError:
        raise AttackError(f"attack {name!r}: {arg!r} is not a number") from None
    if math.isnan(value):
        raise AttackError(f"attack {name!r}: the argument is NaN")
    return Attack(spec.strip(), entry, value)


# --- the attacks -----------------------------------------------------------------

def _npy_array(values: np.ndarray, *, dtype: str, shape: tuple[int, ...]) -> Array:
    """An Array declaring ``dtype`` and ``shape`` whose data are np.save of ``values``."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return Array(dtype=dtype, shape=tuple(int(d) for d in shape), stype=NUMPY_STYPE,
                 data=buffer.getvalue())


def _step(target: Target, factor: float) -> Message:
    """The reply's update (its model minus the one sent) multiplied by ``factor``."""
    reply = target.reply
    sent = target.global_model()
    if target.encoded:
        template = {k: v.shape for k, v in sent.items()}
        delta = target.codec.decode(record_payload(reply.content[ARRAYS_KEY]), template)
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = {k: (factor * v.astype(np.float64)).astype(np.float32)
                      for k, v in delta.items()}
        seed = encoding_seed(0, target.server_round, reply.metadata.src_node_id % 2**31,
                             downlink=False)
        reply.content[ARRAYS_KEY] = payload_record(target.codec.encode(scaled, seed)[0])
        return reply
    model = record_arrays(reply.content[ARRAYS_KEY])
    out = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for key, value in model.items():
            if value.dtype.kind == "f":
                moved = sent[key].astype(np.float64) + factor * (
                    value.astype(np.float64) - sent[key].astype(np.float64))
                value = moved.astype(value.dtype)
            out[key] = value
    reply.content[ARRAYS_KEY] = arrays_record(out)
    return reply


@register_attack("scale", needs_arg=True, payloads=True)
def scale(target: Target, factor: float) -> Message:
    """Model poisoning by boosting: the update becomes ``F x (model - sent)``.

    The reply's model is ``sent + F * (model - sent)``: the attacker's honest step made
    F times longer (F = 1e6 wrecks an unbounded average in one round; 1e3 is subtler).
    """
    return _step(target, factor)


@register_attack("signflip", needs_arg=True, payloads=True)
def signflip(target: Target, factor: float) -> Message:
    """Gradient ascent: the update reversed and scaled, ``sent - F x (model - sent)``."""
    return _step(target, -factor)


@register_attack("examples", needs_arg=True, payloads=True)
def examples(target: Target, count: float) -> Message:
    """A lie about the data: the reply claims ``N`` training examples (1e9, 1.7e308).

    FedAvg weights each update by its claim, so a large one takes the average over.
    """
    claim: int | float = int(count) if count.is_integer() and abs(count) < 2**63 else count
    target.reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] = claim
    return target.reply


def _dense(target: Target) -> dict[str, Array]:
    return dict(target.reply.content[ARRAYS_KEY].items())


def _first_tensor(arrays: dict[str, Array]) -> str:
    """The first array with more than one element (the one the shape lies are about)."""
    for key, array in arrays.items():
        if math.prod(array.shape) > 1:
            return key
    raise AttackError("the reply has no array with more than one element")


@register_attack("float64")
def float64(target: Target, _: float) -> Message:
    """A dtype lie: every float32 array declares float32 but its data hold float64.

    The header a server reads (Array.dtype) says float32; ``Array.numpy()`` decodes the
    data to float64. A server that trusts the header casts the global model up.
    """
    arrays = _dense(target)
    for key, array in arrays.items():
        if array.dtype == "float32":
            arrays[key] = _npy_array(array.numpy().astype(np.float64), dtype="float32",
                                     shape=array.shape)
    target.reply.content[ARRAYS_KEY] = ArrayRecord(arrays)
    return target.reply


@register_attack("shape")
def shape(target: Target, _: float) -> Message:
    """A shape lie: the first tensor declares its right shape, its data hold another.

    The data are the tensor's values flattened with one extra value, shape (size + 1,):
    a server that checks only the declared shape passes them to the aggregation.
    """
    arrays = _dense(target)
    key = _first_tensor(arrays)
    values = arrays[key].numpy()
    other = np.concatenate([values.ravel(), values.ravel()[:1]])
    arrays[key] = _npy_array(other, dtype=arrays[key].dtype, shape=arrays[key].shape)
    target.reply.content[ARRAYS_KEY] = ArrayRecord(arrays)
    return target.reply


@register_attack("scalar")
def scalar(target: Target, _: float) -> Message:
    """A 1-element array where a tensor is expected (declared with the tensor's shape).

    The data hold the tensor's mean as one value of shape (1,): numpy broadcasting
    spreads it over the whole tensor in an average that does not check the data.
    """
    arrays = _dense(target)
    key = _first_tensor(arrays)
    values = arrays[key].numpy()
    one = np.array([values.mean()], dtype=values.dtype)
    arrays[key] = _npy_array(one, dtype=arrays[key].dtype, shape=arrays[key].shape)
    target.reply.content[ARRAYS_KEY] = ArrayRecord(arrays)
    return target.reply


def _copy(reply: Message) -> Message:
    """Another delivery of ``reply``: equal content, its own message id."""
    twin = copy.deepcopy(reply)
    twin.metadata.__dict__["_message_id"] = str(uuid4())
    return twin


@register_attack("duplicate", needs_arg=True, payloads=True)
def duplicate(target: Target, times: float) -> list[Message]:
    """Replay: the attacker's (honest) reply delivered ``K`` times in one round.

    A server that counts every reply gives the node K times its weight.
    """
    k = int(times)
    if k < 1 or k != times:
        raise AttackError(f"duplicate:{times:g}: K must be a whole number of at least 1")
    return [target.reply] + [_copy(target.reply) for _ in range(k - 1)]


def _npy_header(count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (count,)})
    return buffer.getvalue()


def _padding(size: int) -> Array:
    """A valid npy uint8 array whose data are ``size`` bytes (header included).

    ``bytes.ljust`` writes the header and the fill into one new object: no second
    copy of the buffer exists even while it is built. The fill (0xAB) touches every
    page, so the buffer is resident, as received bytes would be.
    """
    count = max(0, size - len(_npy_header(size)))
    head = _npy_header(count)  # npy pads its header to 64 bytes: the same length
    return Array(dtype="uint8", shape=(count,), stype=NUMPY_STYPE,
                 data=head.ljust(len(head) + count, b"\xab"))


@register_attack("oversize", needs_arg=True, payloads=True)
def oversize(target: Target, size: float) -> Message:
    """A memory attack: an extra array makes the reply ``BYTES`` large (e.g. 1GiB).

    The extra array (``padding``, a valid npy uint8 array) is created once, sized by
    the first attacked reply, and reused every round (kept in the grid's cache), so the
    attacker's own memory is one buffer. The reply's size is the sum of its arrays'
    data, as :func:`message_array_bytes` counts it.
    """
    reply = target.reply
    padding = target.cache.get(PADDING_KEY)
    if padding is None:  # sized by the first reply; a payload's size varies a little
        padding = target.cache[PADDING_KEY] = _padding(int(size) - message_array_bytes(reply))
    arrays = dict(reply.content[ARRAYS_KEY].items())
    arrays[PADDING_KEY] = padding
    reply.content[ARRAYS_KEY] = ArrayRecord(arrays)
    return reply


@register_attack("nan")
def nan(target: Target, _: float) -> Message:
    """A diverged (or malicious) client: every float array of its model is NaN."""
    arrays = _dense(target)
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind == "f":
            arrays[key] = Array(np.full_like(values, np.nan))
    target.reply.content[ARRAYS_KEY] = ArrayRecord(arrays)
    return target.reply


# --- the grid ----------------------------------------------------------------------

@dataclass
class Hit:
    """One attacked reply: the round, the node, its partition (-1: unknown), the attack."""

    server_round: int
    node_id: int
    partition: int
    attack: str
    replies: int  # replies delivered in its place


@dataclass
class _Round:
    server_round: int = 0
    sent: dict[int, Message] = field(default_factory=dict)  # node -> its train message
    attackers: set[int] = field(default_factory=set)


class AttackGrid(ForwardingGrid):
    """A Grid whose sampled attackers rewrite their train replies with ``attack``."""

    def __init__(  # pylint: disable=too-many-arguments
        self, grid: Grid, attack: str | Attack, *, attackers_per_round: int = 1,
        seed: int = 0, codec: str | Chain = "none",
    ) -> None:
        """``codec`` is the run's uplink codec (``cfg.codec``): the payload attacks
        decode and re-encode with it; the dense-only attacks refuse a non-identity one."""
        super().__init__(grid)
        self.attack = parse_attack(attack)
        if attackers_per_round < 0:
            raise AttackError(f"attackers_per_round must be >= 0, got {attackers_per_round}")
        self.attackers_per_round = attackers_per_round
        self.seed = seed
        self.codec = parse_codec(codec) if isinstance(codec, str) else codec
        if not self.codec.is_identity and not self.attack.entry.payloads:
            raise AttackError(f"{self.attack.spec}: rewrites dense arrays; codec "
                              f"{self.codec.spec!r} sends payloads (use codec 'none')")
        self.partition_of: dict[int, int] = {}  # learned from the query replies
        self.hits: list[Hit] = []
        self._round = _Round()
        self._cache: dict = {}

    def server_context(self):  # type: ignore[no-untyped-def]
        """The wrapped grid's ServerApp Context, where it has one (the in-process Grid)."""
        return self._grid.server_context()  # type: ignore[attr-defined]

    def held_bytes(self) -> int:
        """Bytes the attack keeps between rounds (the oversize attack's one buffer)."""
        return sum(len(a.data) for a in self._cache.values() if isinstance(a, Array))

    def attackers(self, server_round: int, nodes: Iterable[int]) -> set[int]:
        """The nodes (of those sent a train message) that attack in ``server_round``."""
        ranked = sorted(nodes, key=lambda n: (self.partition_of.get(n, 2**63), n))
        count = min(self.attackers_per_round, len(ranked))
        rng = np.random.default_rng([self.seed, server_round])
        return {ranked[i] for i in rng.choice(len(ranked), size=count, replace=False)}

    def _note(self, messages: list[Message]) -> None:
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return
        config = train[0].content.config_records.get(CONFIG_KEY, {})
        server_round = int(config.get("server-round", self._round.server_round + 1))
        if server_round != self._round.server_round:
            self._round = _Round(server_round)
        self._round.sent.update({m.metadata.dst_node_id: m for m in train})
        self._round.attackers = self.attackers(server_round, self._round.sent)

    def _rewrite(self, replies: Iterable[Message]) -> list[Message]:
        out: list[Message] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            kind = reply.metadata.message_type
            if kind == MessageType.QUERY:
                pid = reported_partition(reply)
                if pid >= 0:
                    self.partition_of[node] = pid
            if (kind != MessageType.TRAIN or reply.has_error()
                    or node not in self._round.attackers or node not in self._round.sent
                    or ARRAYS_KEY not in reply.content.array_records  # declined to train
                    or METRICS_KEY not in reply.content.metric_records):
                out.append(reply)
                continue
            target = Target(reply, self._round.sent[node], self._round.server_round,
                            self.codec, self._cache)
            delivered = self.attack(target)
            self.hits.append(Hit(self._round.server_round, node,
                                 self.partition_of.get(node, -1), self.attack.spec,
                                 len(delivered)))
            out.extend(delivered)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._note(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._rewrite(self._grid.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._note(messages)
        return self._rewrite(self._grid.send_and_receive(messages, timeout=timeout))


def attack_names() -> list[str]:
    """The registered attacks, each with the form of its spec."""
    return [f"{e.name}:VALUE" if e.needs_arg else e.name for e in ATTACKS.values()]


__all__ = [
    "ATTACKS", "Attack", "AttackEntry", "AttackError", "AttackGrid", "Hit", "Target",
    "attack_names", "parse_attack", "parse_number", "register_attack",
]
