"""A strategy wrapper: seeded sampling by partition id, and replies checked before aggregation.

It wraps one of Flower's own strategies (FedAvg, FedAvgM, FedAdam, FedProx), in the
shape of Flower's DP wrappers, and adds what a reproducible, robust run needs:

* Sampling by partition id. Flower's node ids are random on every run and its
  strategies sample them with the global ``random`` module, so two runs with the
  same seed train different clients. We ask each node once for its partition id (a
  ``query`` message), sample partition ids with ``numpy``'s generator seeded by
  ``(seed, round)``, and hand the inner strategy a Grid that shows only those nodes.
* Replies checked one by one. Flower's FedAvg raises on the first inconsistent reply
  and stops the run; here a malformed reply (wrong keys, shapes or dtypes, non-finite
  values, no positive ``num-examples``) is logged and dropped, and the round goes on
  with the others.
* Replies aggregated in partition order, so float sums are identical run to run.
* Compression (``codec``, ``codec-down``): the broadcast global model is replaced by
  one payload after the inner strategy built its messages (FedAvgM and FedOpt keep
  the dense arrays they were given), and each reply's payload is decoded into the
  client's delta and added to the global model before the inner strategy averages.
  A payload that does not decode is rejected like any malformed reply.
* Pruning (``prune``): the global model is pruned to the round's masks before the
  inner strategy sees it, the masks travel with the train messages, replies hold
  only unpruned coordinates, and the aggregate is masked again (server momentum,
  adaptive moments and DP noise move every coordinate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy
from flwr.supercore import log

from smallfed.codec import Chain, PayloadError, chain, encoding_seed
from smallfed.compact.pruning import (
    MASK_RECORD,
    Masks,
    ServerPruning,
    apply_masks,
    compact_template,
    expand,
    mask_record,
)
from smallfed.compact.sharing import ServerSharing
from smallfed.devices.clock import Arrival, RoundClock
from smallfed.config import Config
from smallfed.flower.grids import ForwardingGrid
from smallfed.privacy.user_dp import UserLevelDP
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    arrays_record,
    message_array_bytes,
    payload_record,
    record_arrays,
    record_payload,
)



def make_inner_strategy(cfg: Config) -> FedAvg:
    """Flower's strategy for ``cfg.strategy``; it sees only the nodes we sampled.

    Fractions of 1 and no minimums: the wrapper has already chosen the clients (and
    skips federated evaluation itself when ``fraction-evaluate`` is 0), so the inner
    strategy must take every node it is shown.
    """
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=0,
        min_evaluate_nodes=0,
        min_available_nodes=0,
    )
    if cfg.strategy == "fedavgm":
        return FedAvgM(
            **common, server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum
        )
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    return FedAvg(**common)


@dataclass
class RoundStats:
    """What happened to the train replies of the last round."""

    sampled: int = 0
    aggregated: int = 0
    failed: int = 0
    rejected: int = 0
    declined: int = 0
    offline: int = 0  # device simulation: sampled but not online
    dropped: int = 0  # device simulation: replies past the round's deadline
    finished: int = 0
    sim_time_s: float | None = None


class _VisibleNodes(ForwardingGrid):
    """A view of a Grid that shows only the sampled nodes to the inner strategy."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        super().__init__(grid)
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)


def positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and 0 < value < math.inf


def reported_partition(reply: Message) -> int:
    """The partition id a query reply reports; -1 for none or nonsense."""
    if reply.has_error():
        return -1
    value = reply.content.metric_records.get(METRICS_KEY, {}).get("partition-id", -1)
    return int(value) if isinstance(value, (int, float)) and 0 <= value < 2**31 else -1


def keep_common_metrics(replies: list[Message]) -> None:
    """Reduce each reply's metrics to the finite numbers every reply has.

    Flower's FedAvg raises (and stops the run) when replies carry different metric
    keys or lists of different lengths; one odd client must not do that.
    """
    records = [r.content[METRICS_KEY] for r in replies]
    common = set.intersection(*(set(m) for m in records)) if records else set()
    for reply, metrics in zip(replies, records):
        reply.content[METRICS_KEY] = MetricRecord({
            k: v for k, v in metrics.items()
            if k in common and isinstance(v, (int, float)) and math.isfinite(v)})


class SmallfedStrategy(Strategy):
    """Seeded partition sampling and per-reply checks around one of Flower's strategies."""

    def __init__(
        self, inner: Strategy, *, clients_per_round: int, fraction_evaluate: float, seed: int,
        codec_up: Chain | None = None, codec_down: Chain | None = None,
        min_replies: int = 1, user_dp: UserLevelDP | None = None,
        pruning: ServerPruning | None = None, sharing: ServerSharing | None = None,
        clock: RoundClock | None = None, wait_for_nodes_s: float = 600.0,
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.pruning = pruning
        self.sharing = sharing
        self._masks: Masks = {}  # this round's pruning masks
        self._round_model: ArrayRecord | None = None
        self.user_dp = user_dp
        self.min_replies = min_replies
        self.codec_up = codec_up or chain()
        self.codec_down = codec_down or chain()
        self.clients_per_round = clients_per_round
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.wait_for_nodes_s = wait_for_nodes_s
        self.partition_of: dict[int, int] = {}
        self.last_round = RoundStats()
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self._global: dict[str, np.ndarray] = {}
        self.epsilons: dict[int, float] = {}  # partition id -> the epsilon it last reported
        # Flower's loop counts rounds from 1; a resumed run continues the numbering, which
        # seeds sampling, client training and codecs.
        self.round_offset = 0

    # --- sampling ---------------------------------------------------------
    def discover(self, grid: Grid) -> dict[int, int]:
        """Map node id -> partition id, asking only nodes not seen before.

        Nodes that report no partition id (a real device with only a data folder) get
        the next free ids in node-id order, so the mapping is still deterministic.
        """
        deadline = time.monotonic() + self.wait_for_nodes_s
        # Wait for a full round of nodes before the first round only: later, a device
        # that died or went offline must not stall the federation (the round goes on
        # with the nodes that are there; a returning node joins the next one).
        needed = self.clients_per_round if not self.partition_of else 1
        while len(node_ids := list(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} nodes connected after {self.wait_for_nodes_s:.0f} s; "
                    f"clients-per-round needs {self.clients_per_round}"
                )
            log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids), needed)
            time.sleep(1.0)
        unknown = sorted(n for n in node_ids if n not in self.partition_of)
        if unknown:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                       for n in unknown]
            unassigned = []
            # As long as a round may wait: on Ray the first replies wait for actors to start.
            for reply in grid.send_and_receive(queries, timeout=self.wait_for_nodes_s):
                node = reply.metadata.src_node_id
                pid = reported_partition(reply)
                if pid >= 0 and pid not in self.partition_of.values():
                    self.partition_of[node] = pid
                else:
                    unassigned.append(node)
            next_free = max(self.partition_of.values(), default=-1) + 1
            for offset, node in enumerate(sorted(unassigned)):
                self.partition_of[node] = next_free + offset
        return {n: self.partition_of[n] for n in node_ids if n in self.partition_of}

    def sample(self, grid: Grid, server_round: int, count: int, purpose: int) -> list[int]:
        """``count`` node ids, chosen by partition id with a generator seeded by the round."""
        available = self.discover(grid)
        by_partition = sorted(available, key=available.__getitem__)
        rng = np.random.default_rng([self.seed, server_round, purpose])
        if self.user_dp is not None and purpose == 0:
            # Poisson sampling: each client independently, the sampling the accountant assumes.
            picked = self.user_dp.rng(server_round).random(len(by_partition)) < self.user_dp.sample_rate
            return [node for node, keep in zip(by_partition, picked) if keep]
        chosen = rng.choice(len(by_partition), size=min(count, len(by_partition)), replace=False)
        return [by_partition[i] for i in sorted(chosen)]

    # --- Strategy ---------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._masks = {}
        if self.pruning is not None:
            self._masks = self.pruning.masks_for(server_round, record_arrays(arrays))
            if self._masks:
                arrays = arrays_record(apply_masks(record_arrays(arrays), self._masks))
        if self.sharing is not None:
            shared = self.sharing.prepare(server_round, record_arrays(arrays))
            if self.sharing.reference is not None:
                arrays = arrays_record(shared)
        self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._round_model = arrays  # pruned and shared: kept even if the round fails
        if self.user_dp is not None:
            allowed, after = self.user_dp.start_round()
            if not allowed:
                log(WARNING, "Round %d skipped: it would take epsilon to %.3f, past the budget "
                    "of %.3f; no more training", server_round, after, self.user_dp.budget)
                self.last_round = RoundStats()
                self._global = {}
                if self.clock is not None:  # nobody sampled: a round of no time
                    self.clock.online(server_round, [], self.partition_of)
                return []
        nodes = self.sample(grid, server_round, self.clients_per_round, purpose=0)
        if self.clock is not None:
            nodes = self.clock.online(server_round, nodes, self.partition_of)
        self.last_round = RoundStats(sampled=len(nodes))
        messages = list(self.inner.configure_train(
            server_round, arrays, config, _VisibleNodes(grid, nodes)))
        if self.user_dp is not None or self._masks or not (
            self.codec_up.is_identity and self.codec_down.is_identity
        ):
            self._global = record_arrays(arrays)
        if not self.codec_down.is_identity:
            seed = encoding_seed(self.seed, server_round, -1, downlink=True)
            record = payload_record(self.codec_down.encode(self._global, seed)[0])
            for message in messages:
                message.content[ARRAYS_KEY] = record
        if self._masks:
            masks = mask_record(self._masks)
            for message in messages:
                message.content[MASK_RECORD] = masks
        if self.clock is not None:
            self.clock.sent({m.metadata.dst_node_id: message_array_bytes(m) for m in messages})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = self.on_time(server_round, list(replies))
        good = []
        for reply in replies:
            if reply.has_error():
                self.last_round.failed += 1
                reason = (reply.error.reason or "no reason given").strip().splitlines()
                log(WARNING, "Round %d: node %d failed: %s", server_round,
                    reply.metadata.src_node_id, reason[0] if reason else "no reason given")
                continue
            if self.note_privacy(server_round, reply):
                continue
            problem = self.decode_reply(reply.content) or self.check_reply(reply.content)
            if problem:
                self.last_round.rejected += 1
                log(WARNING, "Round %d: rejected the update of node %d: %s", server_round,
                    reply.metadata.src_node_id, problem)
                continue
            good.append(reply)
        good.sort(key=lambda m: self.partition_of.get(m.metadata.src_node_id, 0))
        keep_common_metrics(good)
        if self.user_dp is not None:
            return self.projected(*self.aggregate_user_dp(server_round, good))
        if len(good) < self.min_replies:
            log(ERROR, "Round %d failed: %d usable updates of %d sampled, min-replies is %d; "
                "the global model stays as it was", server_round, len(good),
                self.last_round.sampled, self.min_replies)
            # As it was, pruned and shared as this round's schedule says.
            changed = self._masks or (self.sharing and self.sharing.reference is not None)
            return (self._round_model, None) if changed else (None, None)
        self.last_round.aggregated = len(good)
        return self.projected(*self.inner.aggregate_train(server_round, good))

    def on_time(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Without device simulation, every reply; with it, those before the deadline."""
        if self.clock is None:
            return replies
        arrivals = []
        for reply in replies:
            examples, declined = 0.0, False
            if not reply.has_error():
                metrics = reply.content.metric_records.get(METRICS_KEY, {})
                value = metrics.get(NUM_EXAMPLES_KEY)
                examples = float(value) if positive_number(value) else 0.0
                declined = bool(metrics.get("declined"))
            node = reply.metadata.src_node_id
            arrivals.append(Arrival(node, self.partition_of.get(node, -1), reply.has_error(),
                                    message_array_bytes(reply), examples, declined))
        kept = self.clock.finish(server_round, arrivals)
        timing = self.clock.last
        self.last_round.offline, self.last_round.dropped = timing.offline, timing.dropped
        self.last_round.finished, self.last_round.sim_time_s = timing.finished, timing.sim_time_s
        if timing.dropped:
            log(INFO, "Round %d: %d stragglers past the %.1f s deadline dropped", server_round,
                timing.dropped, self.clock.cfg.round_deadline_s)
        return [r for r in replies if r.metadata.src_node_id in kept]

    def projected(
        self, arrays: ArrayRecord | None, metrics: MetricRecord | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregate with pruned weights zero and shared weights shared again: server
        momentum, adaptive moments, DP noise and lossy codecs move every coordinate."""
        sharing = self.sharing is not None and self.sharing.reference is not None
        if arrays is None or not (self._masks or sharing):
            return arrays, metrics
        values = apply_masks(record_arrays(arrays), self._masks)
        if sharing:
            values = self.sharing.project(values)
        result = arrays_record(values)
        if isinstance(getattr(self.inner, "current_arrays", None), ArrayRecord):
            self.inner.current_arrays = result  # FedAvgM steps from the model it stored
        return result, metrics

    def aggregate_user_dp(
        self, server_round: int, good: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg's step: global + noisy average of clipped deltas (noise even with none)."""
        if not self._global:  # the round was skipped: the budget is spent
            return None, None
        self.last_round.aggregated = len(good)
        deltas = []
        for reply in good:
            model = record_arrays(reply.content[ARRAYS_KEY])
            deltas.append({k: model[k] - self._global[k] for k in self._global})
        rng = self.user_dp.rng(server_round)
        clip_norm = self.user_dp.clip_norm
        average = self.user_dp.mechanism(deltas, self._global, rng)
        self.user_dp.adapt_clip(deltas, rng)
        log(INFO, "Round %d: DP-FedAvg over %d clients, clip %.4g (next %.4g), noise std %.4g",
            server_round, len(good), clip_norm, self.user_dp.clip_norm,
            self.user_dp.update_noise * clip_norm / self.user_dp.expected_clients)
        new = {k: (self._global[k] + average[k]).astype(self._global[k].dtype) for k in average}
        return arrays_record(new), MetricRecord({"clients": len(good), "dp-clip": clip_norm})

    def note_privacy(self, server_round: int, reply: Message) -> bool:
        """Record a client's reported epsilon; True if it declined to train (budget spent)."""
        metrics = reply.content.metric_records.get(METRICS_KEY)
        if metrics is None:
            return False
        node = reply.metadata.src_node_id
        if isinstance(metrics.get("epsilon"), (int, float)):
            self.epsilons[self.partition_of.get(node, node)] = float(metrics["epsilon"])
        if not metrics.get("declined"):
            return False
        self.last_round.declined += 1
        status = reply.content.config_records.get("status", {})
        log(INFO, "Round %d: node %d declined: %s", server_round, node,
            status.get("reason", "no reason given"))
        return True

    def state(self) -> dict:
        """What a checkpoint keeps of the wrapper (JSON); the inner strategy's is apart."""
        state: dict = {"epsilons": {str(k): v for k, v in self.epsilons.items()}}
        if self.user_dp is not None:
            state["user_dp"] = self.user_dp.state()
        return state

    def restore(self, state: dict) -> None:
        self.epsilons = {int(k): float(v) for k, v in state["epsilons"].items()}
        if self.user_dp is not None:
            self.user_dp.restore(state["user_dp"])

    def epsilon(self) -> tuple[float, float] | None:
        """(largest, mean) epsilon over every client that has reported one, or None.

        Under user-level DP every client has the same guarantee: the server's accountant's.
        """
        if self.user_dp is not None:
            return self.user_dp.epsilon, self.user_dp.epsilon
        if not self.epsilons:
            return None
        values = list(self.epsilons.values())
        return max(values), math.fsum(values) / len(values)  # fsum: order-independent

    def decode_reply(self, content: RecordDict) -> str | None:
        """Replace an encoded update by the client's model (global + delta); or say why not."""
        if self.codec_up.is_identity and not self._masks:
            return None
        try:
            payload = record_payload(content[ARRAYS_KEY])
            template = {k: shape for k, (shape, _) in self._expected.items()}
            # A pruned model's update holds only the unpruned coordinates.
            delta = expand(self.codec_up.decode(payload, compact_template(template, self._masks)),
                           self._masks, template)
        except (AttributeError, KeyError, TypeError, ValueError) as err:  # incl. PayloadError
            kind = "payload" if isinstance(err, PayloadError) else "reply"
            return f"bad {kind}: {err}"
        content[ARRAYS_KEY] = arrays_record(
            {k: (self._global[k] + delta[k]).astype(self._global[k].dtype) for k in delta})
        return None

    def check_reply(self, content: RecordDict) -> str | None:
        """Why a train reply cannot be aggregated, or None if it can."""
        if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {
            METRICS_KEY
        }:
            return (f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord "
                    f"'{METRICS_KEY}', got {list(content.keys())}")
        arrays, metrics = content[ARRAYS_KEY], content[METRICS_KEY]
        if set(arrays) != set(self._expected):
            return f"array keys differ from the global model's ({sorted(set(arrays) ^ set(self._expected))})"
        for key, array in arrays.items():
            shape, dtype = self._expected[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{key}: {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
            try:
                values = array.numpy()
            except Exception as err:  # pylint: disable=broad-exception-caught
                return f"{key}: cannot be decoded ({err})"
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"{key}: holds NaN or infinite values"
        weight = metrics.get(NUM_EXAMPLES_KEY)
        if not positive_number(weight):
            return f"'{NUM_EXAMPLES_KEY}' must be a positive finite number, got {weight!r}"
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.fraction_evaluate <= 0:
            return []
        count = max(1, round(self.fraction_evaluate * len(list(grid.get_node_ids()))))
        nodes = self.sample(grid, server_round, count, purpose=1)
        return self.inner.configure_evaluate(
            server_round, arrays, config, _VisibleNodes(grid, nodes))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        good = [r for r in replies if not r.has_error() and positive_number(
            r.content.metric_records.get(METRICS_KEY, {}).get(NUM_EXAMPLES_KEY))]
        keep_common_metrics(good)
        return self.inner.aggregate_evaluate(server_round, good) if good else None

    def summary(self) -> None:
        log(INFO, "\t├──> smallfed: %d clients per round, sampled by partition id (seed %d)",
            self.clients_per_round, self.seed)
        self.inner.summary()
