"""The one place that states the order of the server's layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy
from torch import nn

from smallfed.codec import parse_codec
from smallfed.config import Config, ConfigError
from smallfed.flower.layers.bound import BoundUpdates
from smallfed.flower.layers.clock import DeviceClock
from smallfed.flower.layers.decode import DecodeUpdates
from smallfed.flower.layers.project import ProjectModel
from smallfed.flower.layers.rollback import RollbackNonFinite
from smallfed.flower.layers.sampling import Partitions, PartitionSampling, RoundOffset
from smallfed.flower.layers.validate import (
    AdmitReplies,
    ClientReports,
    Quorum,
    ValidateReplies,
)
from smallfed.flower.strategies import fewest_replies, make_inner_strategy, required_metrics


def build_strategy(  # pylint: disable=too-many-arguments
    cfg: Config, model: nn.Module, *, input_shape: tuple[int, ...], inner: Strategy | None = None,
    done: int = 0, partition_sizes: list[int] | None = None, wait_for_nodes_s: float = 600.0,
) -> Strategy:
    """The server's strategy for ``cfg``: the layers around ``inner`` (default: the
    registered strategy ``cfg.strategy``), outermost first:

    ======================  ==========================================================
    ``RoundOffset``         rounds numbered after a resume's (``done``)
    ``PartitionSampling``   who trains: seeded by round, by partition id (Poisson
                            under user-level DP)
    ``AdmitReplies``        one reply per node sent a message, no larger than an update
    ``DeviceClock``         devices only: offline nodes skipped, stragglers dropped
    ``ClientReports``       reported epsilons noted; declining replies stop here
    ``ValidateReplies``     failed and malformed replies dropped, example counts checked
    ``DecodeUpdates``       the broadcast encoded (and the round's shared subspace
                            named); each update decoded into a model
    ``BoundUpdates``        each update's norm and weight bounded (not under user DP)
    ``ProjectModel``        pruning and weight sharing: the model kept compact
    ``RollbackNonFinite``   a NaN or infinite aggregate undone
    ``UserLevelDPLayer``    privacy = "user": DP-FedAvg's clipped, noised step; or
    ``Quorum``              at least min-replies updates, with common metrics
    ``inner``               Flower's strategy (or yours): models -> the next model
    ======================  ==========================================================

    With ``secure-aggregation = true`` one layer, ``SecureAggregation``, stands in for
    DecodeUpdates, BoundUpdates, ProjectModel and the DP layer (the server sees only the
    cohort's masked sum: :mod:`smallfed.flower.layers.secure_agg`), above
    RollbackNonFinite and the inner strategy.

    Replies travel up this table: a straggler is dropped before it is validated, a
    payload decoded before it is bounded; the broadcast travels down it.
    ``partition_sizes`` (simulation) lets the server check each client's example count.
    """
    partitions = Partitions(cfg.clients_per_round, wait_for_nodes_s)

    def known_examples(node: int) -> int | None:
        if partition_sizes is None or node not in partitions.reported:
            return None  # a device: its data are its own
        pid = partitions.of[node]
        return partition_sizes[pid] if pid < len(partition_sizes) else None

    strategy = inner if inner is not None else make_inner_strategy(cfg)
    poisson, traffic = None, None
    if cfg.secure_aggregation:
        from smallfed.flower.layers.secure_agg import SecAggTraffic

        traffic = SecAggTraffic()
        strategy, poisson = _secure(cfg, strategy, traffic, model,
                                    lambda node: partitions.of.get(node, node))
    elif cfg.privacy == "user":
        # Here, not at the top: the accountant imports Opacus, which only DP needs.
        from smallfed.flower.layers.user_dp import UserLevelDPLayer
        from smallfed.privacy.user_dp import UserLevelDP

        user_dp = UserLevelDP(cfg)
        momentum = (cfg.server_lr, cfg.server_momentum) if cfg.strategy == "fedavgm" else (1.0, 0.0)
        strategy = UserLevelDPLayer(strategy, user_dp, *momentum)
        poisson = (user_dp.sample_rate, user_dp.rng)
    else:
        strategy = Quorum(strategy, fewest_replies(cfg))
    if not cfg.secure_aggregation:
        strategy = RollbackNonFinite(strategy)
        if cfg.prune != "none" or cfg.share_weights:
            strategy = ProjectModel(strategy, **_compaction(cfg, model))
        if cfg.privacy != "user":  # else the DP layer clips every update to dp-clip
            strategy = BoundUpdates(strategy, clip=cfg.update_clip, factor=cfg.update_clip_factor,
                                    max_examples=cfg.max_examples, known_examples=known_examples)
        strategy = DecodeUpdates(strategy, seed=cfg.seed, codec_up=parse_codec(cfg.codec),
                                 codec_down=parse_codec(cfg.codec_down), subspace=cfg.subspace)
    # Under secure aggregation every reply counts 1: no example count to check.
    strategy = ClientReports(
        ValidateReplies(strategy, None if cfg.secure_aggregation else known_examples,
                        required_metrics(cfg)), partitions,
        note_epsilons=cfg.privacy == "sample")
    if cfg.devices:
        from smallfed.devices import RoundClock, training_flops_per_sample

        clock = RoundClock(cfg, training_flops_per_sample(model, input_shape))
        strategy = DeviceClock(  # secure aggregation: its exchanges charged, counts known
            strategy, clock, partitions, extra_bytes=traffic and traffic.bytes_of,
            examples_of=known_examples if traffic else None)
    strategy = AdmitReplies(strategy, max_reply_bytes(model))
    strategy = PartitionSampling(
        strategy, partitions, clients_per_round=cfg.clients_per_round,
        fraction_evaluate=cfg.fraction_evaluate, seed=cfg.seed, poisson=poisson)
    return RoundOffset(strategy, done)


def _secure(cfg: Config, strategy: Strategy, traffic: Any, model: nn.Module,
            place: Callable[[int], int]) -> tuple[Strategy, tuple | None]:
    """The secure-aggregation layer over ``strategy`` and, under DP, its Poisson sampling;
    it notes each node's protocol bytes in ``traffic`` (a ``SecAggTraffic``).

    The integer encoding is planned here for a large cohort (the expected one plus four
    standard deviations of Poisson sampling), so too few secagg-bits fail before the run.
    """
    from smallfed.flower.layers.secure_agg import SecureAggregation
    from smallfed.flower.secagg import encoding_for, min_survivors
    from smallfed.privacy.subspace import subspace_masks

    sizes = [p.numel() for p in model.state_dict().values()]
    if cfg.subspace > 0:
        template = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        sizes = [int(m.sum()) for m in subspace_masks(cfg.subspace, 0, template).values()]
    expected = cfg.clients_per_round
    cohort = min(cfg.num_clients, math.ceil(expected + 4 * math.sqrt(expected)))
    try:
        encoding_for(cfg, sum(sizes), min_survivors(cohort, cfg.secagg_max_dropout), cohort)
    except ValueError as err:
        raise ConfigError(f"secagg-bits: {err}") from err

    user_dp = None
    if cfg.privacy == "user":
        from smallfed.privacy.user_dp import UserLevelDP

        user_dp = UserLevelDP(cfg)
    layer = SecureAggregation(RollbackNonFinite(strategy), cfg, user_dp, traffic=traffic,
                              place=place)
    return layer, (user_dp.sample_rate, user_dp.rng) if user_dp is not None else None


def max_reply_bytes(model: nn.Module) -> int:
    """The most array bytes an honest train reply of ``model`` can hold, with room to spare.

    A dense reply is the model's fp32 arrays; no codec's payload is larger than the dense
    values plus their positions (at most 4 bytes each) and its header.
    """
    values = sum(p.numel() for p in model.state_dict().values())
    return 2 * 4 * values + (1 << 16)


def _compaction(cfg: Config, model: nn.Module) -> dict:
    from smallfed.compact.pruning import ServerPruning
    from smallfed.compact.sharing import ServerSharing

    return {"pruning": ServerPruning(cfg, model) if cfg.prune != "none" else None,
            "sharing": ServerSharing(cfg, model) if cfg.share_weights else None}
