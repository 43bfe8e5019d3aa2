"""Secure aggregation (SecAgg+ with distributed DP) as a layer: the server sees only sums.

Before the round's training messages leave, this layer runs the protocol's first two
exchanges with the cohort the sampling layer chose (keys, then encrypted shares over
a sparse random graph); it then adds to each training message the shares addressed to
that node. The replies are masked integer vectors, each uniformly random on its own;
after them a last exchange (unmasking) asks the survivors for the shares that remove
the masks, and the server recovers the sum of the surviving clients' encoded updates,
modulo 2^bits, and nothing else (:mod:`smallfed.flower.secagg` lists the exchanges).

The sum is decoded (inverse rotation, scale), divided (by the expected cohort under DP,
as DP-FedAvg does; by the survivors otherwise) and added to the global model; the
strategy below (FedAvg, or FedAvgM for server momentum) gets that one model as the
round's only reply, so its own server step applies unchanged.

Dropouts: a party that leaves after its masked update still counts (its self-mask is
rebuilt from its neighbours' shares); one that leaves before has its pairwise masks
rebuilt and removed. A round aggregates while at least ``min_survivors`` =
ceil((1 - secagg-max-dropout) * cohort) masked updates arrive and every needed secret
has t shares; otherwise it fails, logged, the model stays, and the run goes on.

Under privacy = "user" the clients add the noise: each adds a discrete Gaussian share
sized so that ``min_survivors`` shares carry the central mechanism's noise relative to
the encoding's (rounding-inflated) sensitivity (:mod:`smallfed.privacy.distributed`).
The accountant composes that mechanism with the same noise multiplier as central
DP-FedAvg, so the two report the same epsilon. Against the analyst who sees the
models, Poisson sampling amplifies it; against this server, which knows who took
part, it does not: :meth:`privacy` reports both. The neighbouring relation is zero-out
(a client's update replaced by zeros, its noise share still in the sum).

Hostile clients: every reply of every exchange is parsed defensively; one that cannot
be read is rejected and its node treated as dropped, so no client can stop the server.
The server cannot bound one masked update, but it bounds the decoded sum by what the
survivors' clipped updates and the noise can reach (post-processing).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.config import Config
from smallfed.flower.layers.base import Layer
from smallfed.flower.layers.validate import reject
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    arrays_record,
    message_array_bytes,
    record_bytes,
    record_arrays,
)
from smallfed.flower.secagg import (
    CONFIG_RECORD,
    DATA_RECORD,
    KEY_BYTES,
    byte_array,
    data_record,
    encoding_for,
    int_array,
    min_survivors,
    payload_bytes,
    read_bytes,
    read_ints,
    join_equal,
    rotation_seed,
    split_equal,
    unflatten,
)
from smallfed.codec.bits import unpack_codes
from smallfed.compact.pruning import compact_template, expand
from smallfed.privacy.subspace import round_subspace, subspace_config
from smallfed.secagg.protocol import (
    CIPHERTEXT_BYTES,
    Params,
    SecAggError,
    check_public_key,
    choose_degree,
    choose_graph,
    server_unmask,
)


POLL_S = 0.5  # how often the unmasking checks for replies (Flower's own loop: 3 s)
GRACE_S = 2.0  # how long it waits for spare shares once it has enough


@dataclass
class _Round:
    """What the server holds of one round between its exchanges."""

    params: Params
    cohort: int
    index: dict[int, int]  # node id -> party index
    neighbours: list[list[int]]
    senders: dict[int, list[int]]
    s_publics: dict[int, bytes]
    global_: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    encoding: Any  # IntegerEncoding
    masked: dict[int, np.ndarray] = field(default_factory=dict)


class SecAggTraffic:
    """Each node's secure-aggregation bytes of the current round: (down, up).

    Shared with the device clock (as :class:`Partitions` is shared), which charges the
    key and share exchanges to a device's simulated time; the unmasking comes after the
    clock has timed the round and is not charged.
    """

    def __init__(self) -> None:
        self.of: dict[int, list[int]] = {}

    def bytes_of(self, node: int) -> tuple[int, int]:
        down, up = self.of.get(node, (0, 0))
        return down, up

    def add(self, node: int, down: int = 0, up: int = 0) -> None:
        counts = self.of.setdefault(node, [0, 0])
        counts[0] += down
        counts[1] += up


class SecureAggregation(Layer):
    """SecAgg+: clients mask their clipped integer updates; only the cohort's sum is seen."""

    def __init__(self, strategy: Strategy, cfg: Config, dp: Any = None,
                 timeout: float | None = None, traffic: SecAggTraffic | None = None,
                 place: Callable[[int], int] | None = None) -> None:
        """``dp``: the round's :class:`~smallfed.privacy.user_dp.UserLevelDP` accountant
        under privacy = "user" (the noise is the clients'); None without DP.
        ``traffic``: where each node's protocol bytes are noted for the device clock.
        ``place(node)``: a client's lasting identity (its partition), for counting the
        rounds it was in a sum across restarts; default: the node id."""
        super().__init__(strategy)
        self.cfg, self.dp = cfg, dp
        self.place = place or (lambda node: node)
        self.traffic = traffic or SecAggTraffic()
        self.timeout = timeout if timeout is not None else cfg.secagg_timeout_s
        self._round: _Round | None = None
        self._grid: Grid | None = None
        self._last: _Round | None = None  # the last round that reached training
        self._restored_block: dict[str, Any] = {}  # summary_block() from a checkpoint
        self._taken: dict[int, int] = {}  # client (place) -> rounds its update was in a sum
        self._reset()

    def _reset(self) -> None:
        self.traffic.of.clear()
        self.aggregated = self.failed = self.rejected = self.clipped = 0
        self.bytes_up = self.bytes_down = 0
        self._round = None

    def describe(self) -> str:
        noise = (f", distributed discrete Gaussian noise (multiplier {self.dp.noise:.4g})"
                 if self.dp is not None else ", no noise")
        return (f"SecAgg+, {self.cfg.secagg_bits} bits a coordinate, up to "
                f"{self.cfg.secagg_max_dropout:.0%} of a cohort may drop{noise}")

    # --- the round ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reset()
        self._grid = grid  # the unmasking exchange happens in aggregate_train
        if self.dp is not None:
            allowed, after = self.dp.start_round()
            if not allowed:
                log(WARNING, "Round %d skipped: it would take epsilon to %.3f, past the budget "
                    "of %.3f; no more training", server_round, after, self.dp.budget)
                return []
        if self.cfg.subspace > 0:
            config = ConfigRecord(
                {**config, **subspace_config(self.cfg.subspace, self.cfg.seed, server_round)})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return []
        global_ = record_arrays(arrays)
        template = {k: v.shape for k, v in global_.items()}
        masks = round_subspace(config, template)
        dimension = sum(math.prod(s) for s in compact_template(template, masks).values())
        cohort = len(messages)
        survivors = min_survivors(cohort, self.cfg.secagg_max_dropout)
        if survivors < 3:
            return self._fail(server_round, f"a cohort of {cohort} may leave {survivors} updates "
                              "in the sum, too few to hide each")
        degree, threshold = choose_degree(cohort, self.cfg.secagg_max_dropout)
        params = Params(bits=self.cfg.secagg_bits, length=dimension, threshold=threshold,
                        min_survivors=survivors)
        try:  # checked before the run for the expected cohort; a Poisson sample may be larger
            encoding = encoding_for(self.cfg, dimension, survivors, cohort)
        except ValueError as err:
            return self._fail(server_round, str(err))
        index = {m.metadata.dst_node_id: i for i, m in enumerate(messages)}
        state = _Round(params, cohort, index, [[] for _ in range(cohort)], {}, {}, global_,
                       masks, encoding)
        keys = self._advertise(grid, server_round, state)
        if len(keys) < survivors:
            return self._fail(server_round, f"{len(keys)} of {cohort} nodes sent keys, "
                              f"{survivors} needed")
        shares = self._share(grid, server_round, state, keys, degree)
        if len(shares) < survivors:
            return self._fail(server_round, f"{len(shares)} of {cohort} nodes shared their "
                              f"secrets, {survivors} needed")
        self._round = self._last = state
        out = []
        for message in messages:
            i = index[message.metadata.dst_node_id]
            if i not in shares:
                continue  # left during the key exchanges: out of this round
            senders = [j for j in state.neighbours[i] if j in shares]
            state.senders[i] = senders
            addressed = [shares[j][state.neighbours[j].index(i)] for j in senders]
            # Flower's strategies give every message one shared RecordDict: copy it, so
            # that each node gets its own shares.
            message.content = RecordDict(dict(message.content.items()))
            message.content[CONFIG_RECORD] = ConfigRecord({"round": server_round})
            message.content[DATA_RECORD] = ArrayRecord(
                {"senders": int_array(senders),
                 "ciphertexts": byte_array(join_equal(addressed))})
            self.bytes_down += record_bytes(message.content[DATA_RECORD])
            out.append(message)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, replies = self._round, list(replies)
        if state is None:
            return None, None
        params = state.params
        def masked_of(reply: Message) -> np.ndarray:
            if state.index.get(reply.metadata.src_node_id) not in state.senders:
                raise ValueError("it was not in this round's secure sum")
            return unpack_codes(payload_bytes(reply.content[ARRAYS_KEY]), params.length,
                                params.bits)

        for node, vector in self._read(
                server_round, {r.metadata.src_node_id: r for r in replies}, masked_of).items():
            state.masked[state.index[node]] = vector
        if len(state.masked) < params.min_survivors:
            self._fail(server_round, f"{len(state.masked)} masked updates arrived, "
                       f"{params.min_survivors} needed")
            return None, None
        try:
            total = server_unmask(params, state.neighbours, state.senders, state.s_publics,
                                  state.masked, self._unmask(server_round, state))
        except SecAggError as err:
            self._fail(server_round, str(err))
            return None, None
        except Exception as err:  # pylint: disable=broad-exception-caught
            # Shares come from clients: whatever they break, the round fails, not the run.
            self._fail(server_round, f"unmasking failed ({type(err).__name__}: {err})")
            return None, None
        self.aggregated = len(state.masked)
        for node, i in state.index.items():
            if i in state.masked:
                client = self.place(node)
                self._taken[client] = self._taken.get(client, 0) + 1
        model = self._step(server_round, state, total)
        carrier = replies[0]  # one reply, holding the round's model, for the strategy below
        carrier.content = RecordDict({
            ARRAYS_KEY: arrays_record(model),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 1})})
        arrays, _ = self.strategy.aggregate_train(server_round, [carrier])
        log(INFO, "Round %d: secure sum of %d of %d clients' updates (%d bits, %d coordinates)",
            server_round, self.aggregated, state.cohort, params.bits, params.length)
        return arrays, MetricRecord({"clients": self.aggregated})

    def _step(self, server_round: int, state: _Round, total: np.ndarray) -> dict[str, np.ndarray]:
        """global + the decoded sum / the divisor: the expected cohort under DP (as DP-FedAvg
        divides, so that the divisor reveals nothing), the survivors otherwise."""
        summed = state.encoding.decode_sum(total, rotation_seed(self.cfg.seed, server_round))
        summed = self._bounded(server_round, state, summed)
        divisor = self.dp.expected_clients if self.dp is not None else len(state.masked)
        template = {k: v.shape for k, v in state.global_.items()}
        delta = expand(unflatten(summed / divisor, compact_template(template, state.masks)),
                       state.masks, template)
        return {k: (v + delta[k]).astype(v.dtype) for k, v in state.global_.items()}

    def _bounded(self, server_round: int, state: _Round, summed: np.ndarray) -> np.ndarray:
        """The decoded sum, scaled down to what honest clients can reach.

        The server cannot check one masked update, but it can check the sum: n clipped
        updates (each at most the rounded sensitivity) plus the noise (its norm
        concentrates at sqrt(d) sigma, with a standard deviation of sigma / sqrt(2)). A
        sum beyond that holds a client that did not clip, or a wrapped coordinate; it is
        scaled down, which is post-processing (DP unchanged) and bounds the damage."""
        encoding, n = state.encoding, len(state.masked)
        sigma = math.sqrt(n) * encoding.noise_std * encoding.scale
        limit = n * encoding.sensitivity * encoding.scale + (math.sqrt(summed.size) + 6) * sigma
        norm = float(np.linalg.norm(summed))
        if norm <= limit:
            return summed
        self.clipped += 1
        log(WARNING, "Round %d: the decoded sum's norm %.4g exceeds what %d clipped updates and "
            "the noise reach (%.4g): scaled down; a client sent more than its clip",
            server_round, norm, n, limit)
        return summed * (limit / norm)

    # --- the exchanges ----------------------------------------------------------
    def _exchange(self, grid: Grid, server_round: int, action: str,
                  contents: dict[int, RecordDict],
                  enough: Callable[[set[int]], bool] | None = None) -> dict[int, Message]:
        """Send each node its content as ``query.<action>``; the good replies by node id.

        Waits for every reply, up to ``secagg-timeout-s``; with ``enough(nodes that
        replied)``, only until it holds and a short grace has passed for spare replies:
        the unmasking needs t shares of each secret, not an answer from a node that died.
        """  # Flower's own send_and_receive polls every 3 s; four exchanges a round add up
        messages = [Message(content, node, f"query.{action}", group_id=str(server_round))
                    for node, content in contents.items()]
        for message in messages:
            size = message_array_bytes(message)
            self.bytes_down += size
            self.traffic.add(message.metadata.dst_node_id, down=size)
        replies = self._until_enough(grid, messages, enough or (lambda answered: False))
        for reply in replies:
            size = message_array_bytes(reply)
            self.bytes_up += size
            self.traffic.add(reply.metadata.src_node_id, up=size)
        good = {}
        for reply in replies:
            if reply.has_error():
                self.failed += 1
                log(WARNING, "Round %d: node %d failed in %s: %s", server_round,
                    reply.metadata.src_node_id, action,
                    (reply.error.reason or "no reason").strip().splitlines()[0])
            elif reply.metadata.src_node_id in contents:
                good[reply.metadata.src_node_id] = reply
        return good

    def _until_enough(self, grid: Grid, messages: list[Message],
                      enough: Callable[[set[int]], bool]) -> list[Message]:
        """Flower's send_and_receive, polled every POLL_S, and done once ``enough`` holds
        (plus a grace)."""
        waiting = set(grid.push_messages(messages))
        replies: list[Message] = []
        deadline, grace_end = time.monotonic() + self.timeout, math.inf
        while waiting and time.monotonic() < min(deadline, grace_end):
            new = list(grid.pull_messages(waiting))
            replies += new
            waiting -= {m.metadata.reply_to_message_id for m in new}
            answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
            if grace_end == math.inf and enough(answered):
                grace_end = time.monotonic() + GRACE_S
            if waiting:
                time.sleep(POLL_S)
        return replies

    def _advertise(self, grid: Grid, server_round: int, state: _Round) -> dict[int, bytes]:
        """Exchange 1: party index -> its two public keys (c || s)."""
        base = {**state.params.to_config(), "round": server_round, "cohort": state.cohort}
        contents = {node: RecordDict({CONFIG_RECORD: ConfigRecord({**base, "index": i})})
                    for node, i in state.index.items()}
        def keys_of(reply: Message) -> bytes:
            pair = read_bytes(data_record(reply.content), "keys")
            if len(pair) != 2 * KEY_BYTES:
                raise ValueError(f"{len(pair)} key bytes, expected {2 * KEY_BYTES}")
            for key in (pair[:KEY_BYTES], pair[KEY_BYTES:]):
                check_public_key(key, state.index[reply.metadata.src_node_id])
            return pair

        replies = self._exchange(grid, server_round, "secagg_keys", contents)
        return {state.index[node]: pair
                for node, pair in self._read(server_round, replies, keys_of).items()}

    def _share(self, grid: Grid, server_round: int, state: _Round, keys: dict[int, bytes],
               degree: int) -> dict[int, list[bytes]]:
        """Exchange 2: the graph over the parties with keys; party -> its ciphertexts, one
        per neighbour in the order of its neighbour list."""
        parties = sorted(keys)
        graph = choose_graph(len(parties), min(degree, len(parties)), secrets.token_bytes(16))
        for p, i in enumerate(parties):
            state.neighbours[i] = [parties[q] for q in graph[p]]
            state.s_publics[i] = keys[i][KEY_BYTES:]
        nodes = {i: node for node, i in state.index.items()}
        contents = {}
        for i in parties:
            nb = state.neighbours[i]
            contents[nodes[i]] = RecordDict({
                CONFIG_RECORD: ConfigRecord({"round": server_round}),
                DATA_RECORD: ArrayRecord({"neighbours": int_array(nb),
                                          "keys": byte_array(b"".join(keys[j] for j in nb))})})
        def ciphertexts_of(reply: Message) -> list[bytes]:
            count = len(state.neighbours[state.index[reply.metadata.src_node_id]])
            data = read_bytes(data_record(reply.content), "ciphertexts")
            if len(data) != count * CIPHERTEXT_BYTES:
                raise ValueError(f"{len(data)} bytes of ciphertexts, expected {count} of "
                                 f"{CIPHERTEXT_BYTES}")
            return split_equal(data, count)

        replies = self._exchange(grid, server_round, "secagg_shares", contents)
        return {state.index[node]: texts
                for node, texts in self._read(server_round, replies, ciphertexts_of).items()}

    def _unmask(self, server_round: int, state: _Round
                ) -> dict[int, tuple[list[int], list[bytes]]]:
        """Exchange 4: the survivors are told who survived and who dropped; each answers
        with its shares of the survivors' self-mask seeds and the dropped parties' mask
        secrets (never both of one party)."""
        # Every survivor gets the whole lists: it checks its own neighbours against them
        # and counts the survivors (a server that names too few is refused).
        lists = ArrayRecord({
            "survivors": int_array(sorted(state.masked)),
            "dropped": int_array(sorted(set(state.senders) - set(state.masked)))})
        nodes = {i: node for node, i in state.index.items()}
        contents = {nodes[i]: RecordDict({CONFIG_RECORD: ConfigRecord({"round": server_round}),
                                          DATA_RECORD: lists}) for i in state.masked}
        holders = {i: [i, *state.senders[i]] for i in state.masked}  # of each b
        for i in state.masked:  # and of each dropped party's mask secret
            for j in state.senders[i]:
                if j not in state.masked:
                    holders.setdefault(j, []).append(i)

        def enough(answered: set[int]) -> bool:
            parties = {state.index.get(node) for node in answered}
            return all(len(parties.intersection(h)) >= state.params.threshold
                       for h in holders.values())

        def shares_of(reply: Message) -> tuple[list[int], list[bytes]]:
            data = data_record(reply.content)
            owners = read_ints(data, "owners", state.cohort)
            return owners, split_equal(read_bytes(data, "shares"), len(owners))

        replies = self._exchange(self._grid, server_round, "secagg_unmask", contents, enough)
        return {state.index[node]: shares
                for node, shares in self._read(server_round, replies, shares_of).items()}

    def _read(self, server_round: int, replies: dict[int, Message],
              parse: Callable[[Message], Any]) -> dict[int, Any]:
        """node -> ``parse(reply)``; a reply it cannot parse is rejected, named in the log,
        and its node treated as dropped. Anything may fail on a hostile reply, so anything
        is caught: one client must not stop the round, let alone the server."""
        parsed = {}
        for node, reply in replies.items():
            try:
                parsed[node] = parse(reply)
            except Exception as err:  # pylint: disable=broad-exception-caught
                self.rejected += 1
                reject(server_round, reply, f"{type(err).__name__}: {err}")
        return parsed

    def _fail(self, server_round: int, why: str) -> list[Message]:
        log(WARNING, "Round %d: secure aggregation failed (%s); the model stays, the run goes on",
            server_round, why)
        self._round = None
        return []

    # --- what the server reports ------------------------------------------------
    def round_stats(self) -> dict[str, float]:
        return {"aggregated": self.aggregated, "failed": self.failed, "rejected": self.rejected,
                "clipped": self.clipped, "secagg_bytes_up": self.bytes_up,
                "secagg_bytes_down": self.bytes_down}

    def epsilon(self) -> tuple[float, float] | None:
        if self.dp is None:
            return None
        return self.dp.epsilon, self.dp.epsilon

    def privacy(self) -> dict | None:
        """The mechanism for the accountant, and epsilon against this server (no
        amplification by sampling: it knows who took part; the most rounds any client
        was in a sum, each a Gaussian mechanism of the same multiplier)."""
        if self.dp is None:
            return None
        from smallfed.privacy import ZERO_OUT
        from smallfed.privacy.distributed import unamplified_epsilon

        most = max(self._taken.values(), default=0)
        against = unamplified_epsilon(self.dp.noise, most, self.cfg.dp_delta)
        return {"mechanism": "distributed discrete Gaussian (SecAgg+)", "neighbouring": ZERO_OUT,
                "noise_multiplier": self.dp.noise, "sample_rate": self.dp.sample_rate,
                "rounds_accounted": len(self.dp.history), "epsilon": self.dp.epsilon,
                "epsilon_against_server": against, "most_rounds_of_a_client": most}

    def summary_block(self) -> dict[str, Any]:
        """results.json's ``secure_aggregation``: the encoding of the last round."""
        if self._last is None and self._restored_block:  # resumed, no round trained since
            return dict(self._restored_block)
        block: dict[str, Any] = {"bits": self.cfg.secagg_bits,
                                 "max_dropout": self.cfg.secagg_max_dropout}
        if self._last is not None:
            params, encoding = self._last.params, self._last.encoding
            block.update(coordinates=params.length, threshold=params.threshold,
                         neighbours=max(len(n) for n in self._last.neighbours),
                         min_survivors=params.min_survivors, cohort=self._last.cohort,
                         scale=encoding.scale, noise_std=encoding.noise_std,
                         sensitivity=encoding.sensitivity * encoding.scale)
        return block

    def state(self) -> dict[str, Any]:
        kept: dict[str, Any] = {"taken": {str(k): v for k, v in self._taken.items()},
                                "summary": self.summary_block()}
        if self.dp is not None:
            kept["user_dp"] = self.dp.state()
        return kept

    def restore(self, state: dict[str, Any]) -> None:
        self._taken = {int(k): int(v) for k, v in state.get("taken", {}).items()}
        self._restored_block = dict(state.get("summary", {}))
        if self.dp is not None and "user_dp" in state:
            self.dp.restore(state["user_dp"])
