"""Flower records: models in and out of ArrayRecords, and the bytes they carry."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from torch import nn

# Record keys of the messages between ServerApp and ClientApp (Flower's defaults).
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
CONFIG_KEY = "config"

# The model's input shape and class count travel in every train and evaluate config,
# so a device builds the model without holding (or loading) the server's dataset.
INPUT_SHAPE_KEY = "input-shape"
NUM_CLASSES_KEY = "num-classes"

# An encoded update travels as one Array whose data are the payload's bytes exactly,
# so the bytes counted on the Grid are len(payload), not a serialized numpy copy.
PAYLOAD_KEY = "payload"
PAYLOAD_STYPE = "smallfed.codec"


def model_config(input_shape: tuple[int, ...], num_classes: int) -> dict[str, list[int] | int]:
    """The config entries that let a client build the model: see :func:`model_shape`."""
    return {INPUT_SHAPE_KEY: [int(d) for d in input_shape], NUM_CLASSES_KEY: int(num_classes)}


def model_shape(msg: Message) -> tuple[tuple[int, ...], int]:
    """(input shape, class count) from a train or evaluate message's config."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or INPUT_SHAPE_KEY not in config or NUM_CLASSES_KEY not in config:
        raise ValueError(
            f"the message's config lacks '{INPUT_SHAPE_KEY}' and '{NUM_CLASSES_KEY}': the "
            "ServerApp is older than this ClientApp; run the same smallfed version on both"
        )
    return tuple(int(d) for d in config[INPUT_SHAPE_KEY]), int(config[NUM_CLASSES_KEY])


def model_to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def load_record(model: nn.Module, record: ArrayRecord) -> nn.Module:
    model.load_state_dict(record.to_torch_state_dict(), strict=True)
    return model


def record_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays in a record: what crosses the network for them."""
    return sum(len(array.data) for array in record.values())


def message_array_bytes(message: Message) -> int:
    """Serialized bytes of every array a message carries (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(record_bytes(record) for record in message.content.array_records.values())


def payload_record(payload: bytes) -> ArrayRecord:
    """An ArrayRecord carrying one codec payload as a uint8 array of len(payload) bytes."""
    array = Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)
    return ArrayRecord({PAYLOAD_KEY: array})


def record_payload(record: ArrayRecord) -> bytes:
    """The payload in a record made by :func:`payload_record`; ValueError for anything else."""
    array = record.get(PAYLOAD_KEY) if len(record) == 1 else None
    if array is None or array.stype != PAYLOAD_STYPE:
        raise ValueError(f"expected one '{PAYLOAD_KEY}' array of type {PAYLOAD_STYPE}, got "
                         f"{[(k, a.stype) for k, a in record.items()]}")
    return array.data


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in arrays.items()})
