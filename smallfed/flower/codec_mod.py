"""The client side of update compression: a Flower mod on the train handler.

Before training it decodes a compressed global model (``codec-down``); after
training it replaces the reply's model with one payload holding the encoded delta
(``codec``), so what leaves the device is exactly ``len(payload)`` bytes of arrays.
Error feedback's residual lives in the node's ``Context.state`` (an ArrayRecord),
which Flower keeps for the node across rounds in simulation and on a device.

When the server prunes the model, the train message carries the masks, and the
update holds only the unpruned coordinates of each pruned tensor, encoded with the
codec (an identity codec then sends them as raw fp32): the server knows the masks.
A shared random subspace (its seed in the train config) narrows that to the
subspace's coordinates the same way; with error feedback, what falls outside this
round's subspace stays in the residual for a later round's (user-level DP clips
whatever is sent, and under DP-SGD nothing falls outside: see
:mod:`smallfed.privacy.subspace`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from smallfed.codec import Chain, encoding_seed
from smallfed.compact.pruning import compact, expand, read_masks
from smallfed.privacy.subspace import combine, round_subspace
from smallfed.flower.records import (
    ARRAYS_KEY,
    PAYLOAD_STYPE,
    arrays_record,
    payload_record,
    record_arrays,
    record_payload,
)

RESIDUAL_KEY = "smallfed-codec-residual"
Template = dict[str, tuple[int, ...]]


def client_key(context: Context) -> int:
    """What keeps this client's random draws (shuffling, encoding) its own: its partition
    id in simulation; on a device, which has none, its node id."""
    pid = int(context.node_config.get("partition-id", -1))
    return pid if pid >= 0 else context.node_id % 2**31


def is_payload(record: ArrayRecord) -> bool:
    return any(array.stype == PAYLOAD_STYPE for array in record.values())


def make_codec_mod(
    chains: Callable[[Message, Context], tuple[Chain, Chain, Template, int]],
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod; ``chains(msg, context)`` gives (uplink, downlink, model template, seed)."""

    def codec_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        up, down, template, seed = chains(msg, context)
        received = msg.content[ARRAYS_KEY]
        if is_payload(received):
            msg.content[ARRAYS_KEY] = arrays_record(down.decode(record_payload(received), template))
        pruning = read_masks(msg.content, template)
        subspace = round_subspace(msg.content["config"], template)
        masks = combine(pruning, subspace)
        start = record_arrays(msg.content[ARRAYS_KEY])
        reply = call_next(msg, context)
        if reply.has_error() or (up.is_identity and not masks) or ARRAYS_KEY not in reply.content:
            return reply
        trained = record_arrays(reply.content[ARRAYS_KEY])
        delta = {name: trained[name] - start[name] for name in template}
        residual, held = None, {}
        if up.error_feedback and RESIDUAL_KEY in context.state:
            held = record_arrays(context.state[RESIDUAL_KEY])
            residual = compact(held, masks)
        server_round = int(msg.content["config"]["server-round"])
        payload, residual = up.encode(compact(delta, masks),
                                      encoding_seed(seed, server_round, client_key(context),
                                                    downlink=False),
                                      residual)
        if residual is not None:  # kept dense; what fell on pruned weights is gone with them
            kept = expand(residual, masks, template)
            for name, inside in subspace.items():  # what the subspace left out waits too
                left = np.where(inside, 0.0, delta[name] + held.get(name, 0.0))
                if name in pruning:
                    left = left * pruning[name]
                kept[name] = (kept[name] + left).astype(np.float32)
            context.state[RESIDUAL_KEY] = arrays_record(kept)
        reply.content[ARRAYS_KEY] = payload_record(payload)
        return reply

    return codec_mod
