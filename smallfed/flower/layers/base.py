"""A layer: one concern of the server, as a Flower strategy that wraps another.

The shape is Flower's own DP wrappers (``DifferentialPrivacyServerSideFixedClipping``
takes the strategy it wraps and delegates to it). A :class:`Layer` forwards every call
to ``self.strategy`` unless it overrides it, and adds what the server needs of every
layer:

* ``state()`` / ``restore(state)``: what a checkpoint keeps of it (JSON values and
  numpy arrays, nested in dicts and lists);
* ``round_stats()``: its counts for the last round (summed over the stack into
  results.json's per-round columns);
* ``epsilon()``: the privacy spent so far, if it accounts for any;
* ``adopt(arrays)``: the global model was replaced after aggregation (projected onto a
  pruning mask, say); strategies that step from their last aggregate must step from it.

A layer knows nothing of the layers beside it: it sees messages going down and
replies coming up, and the strategy below it. The innermost strategy is a plain Flower
strategy (FedAvg and friends, or a researcher's own); :func:`inner_state` checkpoints
it without naming its fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.records import arrays_record


class Layer(Strategy):
    """A strategy that wraps ``strategy`` and changes one thing."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    # --- Flower's Strategy: forward by default ----------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %s", type(self).__name__, self.describe())
        self.strategy.summary()

    # --- what smallfed asks of every layer ----------------------------------
    def describe(self) -> str:
        """One line for Flower's start-up summary: what this layer does in this run."""
        return (type(self).__doc__ or "").strip().splitlines()[0]

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this layer (JSON values and numpy arrays)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state` returned."""

    def round_stats(self) -> dict[str, float]:
        """This layer's counts for the last round (e.g. ``{"rejected": 2}``)."""
        return {}

    def epsilon(self) -> tuple[float, float] | None:
        """(largest, mean) epsilon spent so far, if this layer accounts for privacy."""
        return None

    def privacy(self) -> dict[str, Any] | None:
        """What results.json's ``privacy`` block needs to recompute this layer's epsilon."""
        return None

    def adopt(self, arrays: ArrayRecord) -> None:
        """The round's aggregate was replaced by ``arrays``: tell the strategies below."""
        adopt(self.strategy, arrays)


def adopt(strategy: Strategy, arrays: ArrayRecord) -> None:
    """Make ``strategy`` step from ``arrays`` next round.

    Layers forward it; of Flower's strategies only FedAvgM keeps the model it last
    produced (``current_arrays``) and steps from that instead of the model it is sent.
    """
    if isinstance(strategy, Layer) or hasattr(strategy, "adopt"):
        strategy.adopt(arrays)  # type: ignore[attr-defined]
    elif isinstance(getattr(strategy, "current_arrays", None), ArrayRecord):
        strategy.current_arrays = arrays  # type: ignore[attr-defined]


def stack(strategy: Strategy) -> Iterator[Strategy]:
    """Every strategy of a stack, outermost first, the inner Flower strategy last."""
    while True:
        yield strategy
        if not isinstance(strategy, Layer):
            return
        strategy = strategy.strategy


def find(strategy: Strategy, kind: type) -> Any:
    """The first strategy of the stack that is a ``kind``, or None."""
    return next((s for s in stack(strategy) if isinstance(s, kind)), None)


def inner_state(strategy: Strategy) -> dict[str, Any]:
    """What a Flower strategy carries between rounds, without naming its fields.

    A strategy with its own ``state()`` is asked. Otherwise every attribute holding
    arrays is kept: FedAvgM's model and momentum, FedAdam's moments, whatever a
    researcher's strategy keeps in an ArrayRecord or a list or dict of numpy arrays.
    """
    if hasattr(strategy, "state") and hasattr(strategy, "restore"):
        return {"own": strategy.state()}  # type: ignore[attr-defined]
    kept: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, ArrayRecord):
            kept[name] = {"kind": "record", "arrays": {k: a.numpy() for k, a in value.items()}}
        elif _all_arrays(value, list):
            kept[name] = {"kind": "list", "arrays": [np.asarray(v) for v in value]}
        elif _all_arrays(value, dict):
            kept[name] = {"kind": "dict", "arrays": {k: np.asarray(v) for k, v in value.items()}}
    return {"attributes": kept}


def restore_inner(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what :func:`inner_state` took."""
    if "own" in state:
        strategy.restore(state["own"])  # type: ignore[attr-defined]
        return
    for name, saved in state["attributes"].items():
        kind, arrays = saved["kind"], saved["arrays"]
        value = (arrays_record(arrays) if kind == "record" else list(arrays) if kind == "list"
                 else dict(arrays))
        setattr(strategy, name, value)


def _all_arrays(value: object, container: type) -> bool:
    if not isinstance(value, container) or not value:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(isinstance(v, np.ndarray) for v in items)  # type: ignore[union-attr]


def stack_state(strategy: Strategy) -> dict[str, Any]:
    """Every layer's state by a key of its class name, and the inner strategy's."""
    state: dict[str, Any] = {}
    for part in stack(strategy):
        key = _key(part, state)
        state[key] = part.state() if isinstance(part, Layer) else inner_state(part)
    return state


def restore_stack(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what :func:`stack_state` took; a layer the checkpoint lacks keeps its own."""
    seen: dict[str, Any] = {}
    for part in stack(strategy):
        key = _key(part, seen)
        seen[key] = True
        if key not in state:
            continue
        if isinstance(part, Layer):
            part.restore(state[key])
        else:
            restore_inner(part, state[key])


def _key(part: Strategy, taken: dict[str, Any]) -> str:
    name = type(part).__name__ if isinstance(part, Layer) else "inner"
    key, n = name, 1
    while key in taken:
        n += 1
        key = f"{name}-{n}"
    return key


def stack_stats(strategy: Strategy) -> dict[str, float]:
    """The last round's counts of every layer, summed by name."""
    totals: dict[str, float] = {}
    for part in stack(strategy):
        if isinstance(part, Layer):
            for name, value in part.round_stats().items():
                totals[name] = totals.get(name, 0) + value
    return totals


def stack_epsilon(strategy: Strategy) -> tuple[float, float] | None:
    """The epsilon of the outermost layer that accounts for privacy, or None."""
    for part in stack(strategy):
        if isinstance(part, Layer) and (spent := part.epsilon()) is not None:
            return spent
    return None


def stack_privacy(strategy: Strategy) -> dict[str, Any] | None:
    """The privacy record of the outermost layer that accounts for privacy, or None."""
    for part in stack(strategy):
        if isinstance(part, Layer) and (record := part.privacy()) is not None:
            return record
    return None
