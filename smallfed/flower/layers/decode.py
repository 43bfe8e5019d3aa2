"""Updates in and out of their codecs: the broadcast encoded, each reply decoded.

Below this layer every reply holds the client's whole model, whatever crossed the
network, so the strategies below aggregate models as Flower's always do.

* Downlink (``codec-down``): after the layers below built the round's messages, their
  global model is replaced by one payload (FedAvgM and FedOpt keep the dense arrays
  they were given).
* Shared subspace (``subspace``, :mod:`smallfed.privacy.subspace`): each round's seed
  goes down in the train config, and updates hold only the subspace's coordinates.
* Uplink (``codec``, or pruning, whose updates hold only the unpruned coordinates): each
  reply's payload is decoded into the client's delta, against the layout of the model
  it was sent, and added to that model. A payload that does not decode is rejected.
* Without either, a reply's arrays must be the model's own: the same names, shapes and
  dtypes as the model sent, with finite values; checked on the data themselves, not
  on the shape and dtype an Array declares.

The model and masks sent are read off the outgoing messages, so this layer needs
nothing from the layers beside it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from smallfed.codec import Chain, PayloadError, chain, encoding_seed
from smallfed.compact.pruning import MASK_RECORD, Masks, compact_template, expand, read_masks
from smallfed.flower.layers.base import Layer
from smallfed.flower.layers.validate import reject
from smallfed.flower.records import (
    ARRAYS_KEY,
    arrays_record,
    payload_record,
    record_arrays,
    record_payload,
)
from smallfed.privacy.subspace import combine, round_subspace, subspace_config


class DecodeUpdates(Layer):
    """Encodes the broadcast model; decodes (or checks) each reply into a client's model."""

    def __init__(self, strategy: Strategy, *, seed: int, codec_up: Chain | None = None,
                 codec_down: Chain | None = None, subspace: float = 0.0) -> None:
        super().__init__(strategy)
        self.seed = seed
        self.subspace = subspace
        self.codec_up = codec_up or chain()
        self.codec_down = codec_down or chain()
        self.rejected = 0
        self._global: dict[str, np.ndarray] = {}  # the model this round's clients were sent
        self._masks: Masks = {}

    def describe(self) -> str:
        return f"uplink codec {self.codec_up.spec!r}, downlink {self.codec_down.spec!r}"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.rejected = 0
        if self.subspace > 0:
            config = ConfigRecord(
                {**config, **subspace_config(self.subspace, self.seed, server_round)})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._global, self._masks = {}, {}
        if not messages:
            return messages
        content = messages[0].content
        self._global = record_arrays(content[ARRAYS_KEY])
        template = {k: v.shape for k, v in self._global.items()}
        if MASK_RECORD in content.array_records:
            self._masks = read_masks(content, template)
        self._masks = combine(self._masks, round_subspace(content["config"], template))
        if not self.codec_down.is_identity:
            seed = encoding_seed(self.seed, server_round, -1, downlink=True)
            record = payload_record(self.codec_down.encode(self._global, seed)[0])
            for message in messages:
                message.content[ARRAYS_KEY] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = []
        for reply in replies:
            problem = self.decode(reply) if self.encoded else self.check(reply)
            if problem:
                self.rejected += 1
                reject(server_round, reply, problem)
            else:
                good.append(reply)
        arrays, metrics = self.strategy.aggregate_train(server_round, good)
        return self._as_sent(arrays), metrics

    def _as_sent(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the dtypes of the model sent: Flower's FedOpt strategies
        (FedAdam, FedYogi, FedAdagrad) return float64, and next round every float32
        update would then be rejected as not matching the model."""
        if arrays is None or not self._global:
            return arrays
        values = record_arrays(arrays)
        if all(values[k].dtype == v.dtype for k, v in self._global.items() if k in values):
            return arrays
        return arrays_record({k: v.astype(self._global[k].dtype) if k in self._global else v
                              for k, v in values.items()})

    @property
    def encoded(self) -> bool:
        """Do replies carry a payload? (A pruned model's update holds only unpruned values.)"""
        return not self.codec_up.is_identity or bool(self._masks)

    def decode(self, reply: Message) -> str | None:
        """Replace an encoded update by the client's model (global + delta); or say why not."""
        template = {k: v.shape for k, v in self._global.items()}
        try:
            payload = record_payload(reply.content[ARRAYS_KEY])
            delta = expand(self.codec_up.decode(payload, compact_template(template, self._masks)),
                           self._masks, template)
        except (AttributeError, KeyError, TypeError, ValueError) as err:  # incl. PayloadError
            kind = "payload" if isinstance(err, PayloadError) else "reply"
            return f"bad {kind}: {err}"
        reply.content[ARRAYS_KEY] = arrays_record(
            {k: (self._global[k] + delta[k]).astype(self._global[k].dtype) for k in delta})
        return None

    def check(self, reply: Message) -> str | None:
        """Why a dense update is not a model like the one sent, or None if it is."""
        arrays = reply.content[ARRAYS_KEY]
        if set(arrays) != set(self._global):
            return (f"array keys differ from the global model's "
                    f"({sorted(set(arrays) ^ set(self._global))})")
        for key, array in arrays.items():
            sent = self._global[key]
            if tuple(array.shape) != sent.shape or array.dtype != str(sent.dtype):
                return (f"{key}: {array.dtype}{list(array.shape)}, expected "
                        f"{sent.dtype}{list(sent.shape)}")
            try:
                values = array.numpy()
            except Exception as err:  # pylint: disable=broad-exception-caught
                return f"{key}: cannot be decoded ({err})"
            if values.shape != sent.shape or values.dtype != sent.dtype:  # the data, not the label
                return (f"{key}: declared {array.dtype}{list(array.shape)}, but its data hold "
                        f"{values.dtype}{list(values.shape)}")
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"{key}: holds NaN or infinite values"
        return None

    def round_stats(self) -> dict[str, float]:
        return {"rejected": self.rejected}
