"""The global model kept on its compact form: pruned (``prune``) and shared (``share-weights``).

Before a round the global model is pruned to the round's masks and, in the share
rounds, clustered; the masks travel with the train messages. After aggregation the
result is masked and snapped to the round's clusters again, because server momentum,
adaptive moments, DP noise and lossy codecs move every coordinate. A round that fails
keeps the model as it was, pruned and shared as the round's schedule says.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from smallfed.compact.pruning import MASK_RECORD, Masks, ServerPruning, apply_masks, mask_record
from smallfed.compact.sharing import ServerSharing
from smallfed.flower.layers.base import Layer
from smallfed.flower.records import arrays_record, record_arrays


class ProjectModel(Layer):
    """Prunes and shares the global model before a round, and the aggregate after it."""

    def __init__(self, strategy: Strategy, *, pruning: ServerPruning | None = None,
                 sharing: ServerSharing | None = None) -> None:
        super().__init__(strategy)
        self.pruning = pruning
        self.sharing = sharing
        self._masks: Masks = {}
        self._round_model: ArrayRecord | None = None

    def describe(self) -> str:
        parts = []
        if self.pruning is not None:
            parts.append(f"{self.pruning.cfg.prune} pruning to {self.pruning.cfg.prune_sparsity:g}")
        if self.sharing is not None:
            parts.append(f"{self.sharing.cfg.share_weights} shared values a tensor")
        return ", ".join(parts)

    @property
    def changed(self) -> bool:
        """Does this round's model differ from the one the round was given?"""
        return bool(self._masks) or (self.sharing is not None
                                     and self.sharing.reference is not None)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._masks = {}
        if self.pruning is not None:
            self._masks = self.pruning.masks_for(server_round, record_arrays(arrays))
            if self._masks:
                arrays = arrays_record(apply_masks(record_arrays(arrays), self._masks))
        if self.sharing is not None:
            shared = self.sharing.prepare(server_round, record_arrays(arrays))
            if self.sharing.reference is not None:
                arrays = arrays_record(shared)
        self._round_model = arrays  # kept even if the round fails
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._masks:
            masks = mask_record(self._masks)
            for message in messages:
                message.content[MASK_RECORD] = masks
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if not self.changed:
            return arrays, metrics
        if arrays is None:  # the round failed: as it was, pruned and shared for this round
            return self._round_model, None
        values = apply_masks(record_arrays(arrays), self._masks)
        if self.sharing is not None and self.sharing.reference is not None:
            values = self.sharing.project(values)
        result = arrays_record(values)
        self.adopt(result)  # e.g. FedAvgM steps from the projected model next round
        return result, metrics
