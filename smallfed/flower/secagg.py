"""Secure aggregation on Flower's Message API: the wire, and the client's side.

Flower 1.42 runs SecAgg+ only on its legacy path; here the protocol of
:mod:`smallfed.secagg.protocol` travels in ordinary Message-API messages. One training
round is four exchanges, each between the server's
:class:`smallfed.flower.layers.secure_agg.SecureAggregation` and the round's cohort:

=========================  ===============================  ==============================
message type               server sends                     client replies
=========================  ===============================  ==============================
``query.secagg_keys``      its index, the round's params    two fresh public keys
``query.secagg_shares``    its neighbours and their keys    its secrets' shares, encrypted
``train``                  the model, shares addressed      its masked integer update
                           to it
``query.secagg_unmask``    who survived, who dropped        shares that remove the masks
=========================  ===============================  ==============================

The client's secrets live in its ``Context.state`` between the exchanges (the
SuperNode's memory on a device). Everything of variable size travels as arrays, so the
Grid's byte count sees it; the masked update is exactly ``ceil(d * bits / 8)`` bytes.

What a client checks (it trusts the server to follow the protocol, not to be kind):
the bits are the run's, the cohort's minimum of survivors is not below what
``secagg-max-dropout`` allows (its noise share assumes that many), and it computes its
integer encoding and noise itself from the run's configuration, never from numbers
the server sends. The reply holds the masked update and a count of 1, nothing else:
no training loss, no example count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from smallfed.codec.bits import pack_codes
from smallfed.compact.pruning import compact
from smallfed.config import Config
from smallfed.flower.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PAYLOAD_KEY,
    record_arrays,
)
from smallfed.privacy.subspace import FRACTION_KEY, SEED_KEY, round_subspace

CONFIG_RECORD = "secagg"  # the round's numbers (ConfigRecord)
DATA_RECORD = "secagg-data"  # keys, ciphertexts, index lists (ArrayRecord: counted bytes)
STATE_KEY = "smallfed-secagg"  # the protocol's secrets in Context.state
ROUND_KEY = "smallfed-secagg-round"  # which round and cohort they belong to
STYPE = "smallfed.secagg"
KEY_BYTES = 32  # an X25519 public key

Template = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------- the wire

def join_equal(items: Sequence[bytes]) -> bytes:
    """Byte strings of one length (ciphertexts, shares) as one, with no framing: the
    receiver knows how many there are."""
    if len({len(item) for item in items}) > 1:
        raise ValueError("secure aggregation: items of different lengths cannot be joined")
    return b"".join(items)


def split_equal(data: bytes, count: int) -> list[bytes]:
    """Inverse of :func:`join_equal` for ``count`` items; ValueError if they cannot be."""
    if count == 0:
        if data:
            raise ValueError("secure aggregation: bytes where none were expected")
        return []
    size, rest = divmod(len(data), count)
    if rest or not size:
        raise ValueError(f"secure aggregation: {len(data)} bytes do not split into {count} "
                         "equal items")
    return [bytes(data[k * size:(k + 1) * size]) for k in range(count)]


def byte_array(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))


def int_array(values: Sequence[int]) -> Array:
    """Party indices: 2 bytes each (a cohort has fewer than 65,536 parties)."""
    return Array(np.asarray(values, dtype=np.uint16).reshape(-1))


def data_record(content: RecordDict) -> ArrayRecord:
    """The protocol's ArrayRecord of a message; ValueError if it has none."""
    record = content.array_records.get(DATA_RECORD)
    if record is None:
        raise ValueError(f"secure aggregation: no '{DATA_RECORD}' arrays in the message")
    return record


def _array(record: ArrayRecord, key: str) -> Array:
    array = record.get(key)
    if not isinstance(array, Array):
        raise ValueError(f"secure aggregation: '{key}' missing or not an array")
    return array


def read_bytes(record: ArrayRecord, key: str) -> bytes:
    array = _array(record, key)
    if array.stype != STYPE or array.dtype != "uint8":
        raise ValueError(f"secure aggregation: '{key}' is not bytes")
    return bytes(array.data)


def read_ints(record: ArrayRecord, key: str, below: int) -> list[int]:
    """A list of party indices, each in [0, below)."""
    values = _array(record, key).numpy()
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ValueError(f"secure aggregation: '{key}' is not a list of indices")
    if values.size and (values.min() < 0 or values.max() >= below):
        raise ValueError(f"secure aggregation: '{key}' names a party outside 0..{below - 1}")
    return [int(v) for v in values]


def payload_bytes(record: ArrayRecord) -> bytes:
    """The masked update's bytes from a train reply's ArrayRecord."""
    array = record.get(PAYLOAD_KEY) if len(record) == 1 else None
    if not isinstance(array, Array) or array.stype != STYPE or array.dtype != "uint8":
        raise ValueError(f"expected one '{PAYLOAD_KEY}' array of type {STYPE} (a masked update)")
    return bytes(array.data)


# --------------------------------------------------------------------------- shared numbers

def min_survivors(cohort: int, max_dropout: float) -> int:
    """The fewest masked updates a round of ``cohort`` may sum: the rest may drop."""
    return math.ceil((1 - max_dropout) * cohort - 1e-9)


def rotation_seed(seed: int, server_round: int) -> int:
    """The round's public rotation: both sides derive it from the run's seed."""
    return int(np.random.SeedSequence([seed, server_round, 23]).generate_state(1)[0])


def secagg_clip(cfg: Config) -> float:
    """Each update's L2 bound: dp-clip under user-level DP, else update-clip."""
    return cfg.dp_clip if cfg.privacy == "user" else cfg.update_clip


def encoding_for(cfg: Config, dimension: int, survivors: int, cohort: int):  # -> IntegerEncoding
    """The round's integer encoding, computed alike by the server and every client."""
    noise = _noise(cfg) if cfg.privacy == "user" else 0.0
    return _encoding(dimension, secagg_clip(cfg), cfg.secagg_bits, noise, survivors, cohort)


@lru_cache(maxsize=8)
def _noise(cfg: Config) -> float:
    """The run's noise multiplier; cached, since a target epsilon means an Opacus search
    and every client asks every round."""
    from smallfed.privacy.user_dp import user_noise  # Opacus: only under DP

    return user_noise(cfg)


@lru_cache(maxsize=64)
def _encoding(dimension: int, clip: float, bits: int, noise: float, survivors: int, cohort: int):
    from smallfed.privacy.distributed import plan_encoding

    return plan_encoding(dimension=dimension, clip=clip, bits=bits, noise_multiplier=noise,
                         min_survivors=survivors, max_clients=cohort)


def flatten(update: Mapping[str, np.ndarray], template: Template) -> np.ndarray:
    """An update's values in the template's order, as one float64 vector."""
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in template])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = vector[at:at + size].reshape(shape)
        at += size
    return out


# --------------------------------------------------------------------------- the client

def _held(context: Context, server_round: int):  # -> (state, Params, cohort)
    """This node's protocol state for ``server_round``, with the round's parameters and
    cohort size, as the key exchange stored them; ValueError if it holds none."""
    from smallfed.secagg.protocol import Params

    own = context.state.config_records.get(ROUND_KEY)
    if own is None or STATE_KEY not in context.state.config_records:
        raise ValueError("secure aggregation: this node holds no keys for this round (it "
                         "restarted, or missed the key exchange); it sits this round out")
    if int(own["round"]) != server_round:
        raise ValueError(f"secure aggregation: this node's keys are for round {own['round']}, "
                         f"the message is for round {server_round}")
    return dict(context.state[STATE_KEY]), Params.from_config(own), int(own["cohort"])


def _save(context: Context, state: Mapping) -> None:
    context.state[STATE_KEY] = ConfigRecord(dict(state))


def _reply(msg: Message, arrays: Mapping[str, Array]) -> Message:
    return Message(RecordDict({DATA_RECORD: ArrayRecord(dict(arrays))}), reply_to=msg)


def handle_keys(msg: Message, context: Context, cfg: Config) -> Message:
    """Exchange 1: fresh key pairs for this round; the public halves go up."""
    from smallfed.secagg.protocol import Params, choose_degree, client_keys

    conf = msg.content.config_records[CONFIG_RECORD]
    params = Params.from_config(conf)
    cohort, index = int(conf["cohort"]), int(conf["index"])
    if not 0 <= index < cohort:
        raise ValueError(f"secure aggregation: index {index} outside a cohort of {cohort}")
    if params.bits != cfg.secagg_bits:
        raise ValueError(f"secure aggregation: the server asks for {params.bits} bits, this "
                         f"run's secagg-bits is {cfg.secagg_bits}")
    floor = min_survivors(cohort, cfg.secagg_max_dropout)
    if params.min_survivors < floor:
        # Each client's noise share assumes this many shares in the sum: fewer would
        # leave the sum less noisy than the accountant counts.
        raise ValueError(f"secure aggregation: the server would unmask {params.min_survivors} "
                         f"of {cohort} updates; this run's secagg-max-dropout needs at least "
                         f"{floor}")
    _, threshold = choose_degree(cohort, cfg.secagg_max_dropout)
    if params.threshold < threshold:
        raise ValueError(f"secure aggregation: the server asks for a threshold of "
                         f"{params.threshold} shares; a cohort of {cohort} needs {threshold}")
    state, c_public, s_public = client_keys(index)
    _save(context, state)
    context.state[ROUND_KEY] = ConfigRecord(
        {**params.to_config(), "round": int(conf["round"]), "cohort": cohort})
    return _reply(msg, {"keys": byte_array(c_public + s_public)})


def handle_shares(msg: Message, context: Context) -> Message:
    """Exchange 2: this node's secrets, shared among its neighbours, encrypted to each."""
    from smallfed.secagg.protocol import client_shares

    conf, data = msg.content.config_records[CONFIG_RECORD], data_record(msg.content)
    state, params, cohort = _held(context, int(conf["round"]))
    neighbours = read_ints(data, "neighbours", cohort)
    keys = read_bytes(data, "keys")
    if len(keys) != 2 * KEY_BYTES * len(neighbours):
        raise ValueError(f"secure aggregation: {len(keys)} key bytes for "
                         f"{len(neighbours)} neighbours")
    pairs = split_equal(keys, len(neighbours))  # each: encryption key || mask key
    state, ciphertexts = client_shares(state, params, neighbours, [p[:KEY_BYTES] for p in pairs],
                                       [p[KEY_BYTES:] for p in pairs])
    _save(context, state)
    return _reply(msg, {"ciphertexts": byte_array(join_equal(ciphertexts))})


def handle_unmask(msg: Message, context: Context) -> Message:
    """Exchange 4: the shares that remove the survivors' self-masks and the dropped
    parties' pairwise masks (never both of one party); the secrets are then forgotten."""
    from smallfed.secagg.protocol import client_unmask

    conf, data = msg.content.config_records[CONFIG_RECORD], data_record(msg.content)
    state, _, cohort = _held(context, int(conf["round"]))
    owners, shares = client_unmask(state, read_ints(data, "survivors", cohort),
                                   read_ints(data, "dropped", cohort))
    del context.state[STATE_KEY]
    del context.state[ROUND_KEY]
    return _reply(msg, {"owners": int_array(owners), "shares": byte_array(join_equal(shares))})


def make_secagg_mod(
    config_of: Callable[[Context], Config], template_of: Callable[[Config, Message], Template],
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The train handler's outermost mod (exchange 3): train, then send the update as a
    masked integer vector instead of a model.

    Training sees neither the protocol's records nor the round's subspace (the codec mod
    below would send the subspace's values in the clear); this mod keeps the subspace's
    coordinates of the delta, encodes them (clip, rotation, rounding, the client's noise
    share, modulo 2^bits) and masks them.
    """

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = config_of(context)
        if not cfg.secure_aggregation:
            return call_next(msg, context)
        if CONFIG_RECORD not in msg.content.config_records:
            # The run promises that no update leaves in the clear: not even if asked.
            raise ValueError("secure aggregation: this train message has no secure-"
                             "aggregation keys, and this run's updates leave only masked")
        from smallfed.secagg.protocol import client_masked

        conf, data = msg.content.config_records[CONFIG_RECORD], data_record(msg.content)
        server_round = int(conf["round"])
        state, params, cohort = _held(context, server_round)
        senders = read_ints(data, "senders", cohort)
        ciphertexts = split_equal(read_bytes(data, "ciphertexts"), len(senders))
        template = template_of(cfg, msg)
        train_config = msg.content[CONFIG_KEY]
        subspace = round_subspace(train_config, template)
        del msg.content[CONFIG_RECORD]
        del msg.content[DATA_RECORD]
        msg.content[CONFIG_KEY] = ConfigRecord(
            {k: v for k, v in train_config.items() if k not in (FRACTION_KEY, SEED_KEY)})
        start = record_arrays(msg.content[ARRAYS_KEY])
        reply = call_next(msg, context)
        if reply.has_error() or ARRAYS_KEY not in reply.content:
            return reply  # failed or declined: no update, the round goes on without it
        trained = record_arrays(reply.content[ARRAYS_KEY])
        delta = flatten(compact({k: trained[k] - start[k] for k in template}, subspace), template)
        if delta.size != params.length:
            raise ValueError(f"secure aggregation: the update has {delta.size} coordinates, "
                             f"the round expects {params.length}")
        encoding = encoding_for(cfg, delta.size, params.min_survivors, cohort)
        vector = encoding.encode(delta, rotation_seed(cfg.seed, server_round))
        state, masked = client_masked(state, params, senders, ciphertexts, vector)
        _save(context, state)
        payload = byte_array(pack_codes(masked, params.bits))
        content = RecordDict({ARRAYS_KEY: ArrayRecord({PAYLOAD_KEY: payload}),
                              METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 1})})
        return Message(content, reply_to=msg)

    return secagg_mod
