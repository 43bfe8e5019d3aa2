"""Flower records: models in and out of ArrayRecords, and the bytes they carry."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from torch import nn


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
