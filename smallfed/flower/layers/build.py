"""The one place that states the order of the server's layers."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy
from torch import nn

from smallfed.codec import parse_codec
from smallfed.config import Config
from smallfed.flower.layers.clock import DeviceClock
from smallfed.flower.layers.decode import DecodeUpdates
from smallfed.flower.layers.project import ProjectModel
from smallfed.flower.layers.sampling import Partitions, PartitionSampling, RoundOffset
from smallfed.flower.layers.validate import ClientReports, Quorum, ValidateReplies
from smallfed.flower.strategies import fewest_replies, make_inner_strategy


def build_strategy(
    cfg: Config, model: nn.Module, *, input_shape: tuple[int, ...], inner: Strategy | None = None,
    done: int = 0, wait_for_nodes_s: float = 600.0,
) -> Strategy:
    """The server's strategy for ``cfg``: the layers around ``inner`` (default: the
    registered strategy ``cfg.strategy``), outermost first:

    ======================  ==========================================================
    ``RoundOffset``         rounds numbered after a resume's (``done``)
    ``PartitionSampling``   who trains: seeded by round, by partition id (Poisson
                            under user-level DP)
    ``DeviceClock``         devices only: offline nodes skipped, stragglers dropped
    ``ClientReports``       reported epsilons noted; declining replies stop here
    ``ValidateReplies``     failed and malformed replies dropped
    ``DecodeUpdates``       the broadcast encoded; each update decoded into a model
    ``ProjectModel``        pruning and weight sharing: the model kept compact
    ``UserLevelDPLayer``    privacy = "user": DP-FedAvg's clipped, noised step; or
    ``Quorum``              at least min-replies updates, with common metrics
    ``inner``               Flower's strategy (or yours): models -> the next model
    ======================  ==========================================================

    Replies travel up this table: a straggler is dropped before it is validated, a
    payload decoded before it is projected; the broadcast travels down it.
    """
    partitions = Partitions(cfg.clients_per_round, wait_for_nodes_s)
    strategy = inner if inner is not None else make_inner_strategy(cfg)
    poisson = None
    if cfg.privacy == "user":
        # Here, not at the top: the accountant imports Opacus, which only DP needs.
        from smallfed.flower.layers.user_dp import UserLevelDPLayer
        from smallfed.privacy.user_dp import UserLevelDP

        user_dp = UserLevelDP(cfg)
        strategy = UserLevelDPLayer(strategy, user_dp)
        poisson = (user_dp.sample_rate, user_dp.rng)
    else:
        strategy = Quorum(strategy, fewest_replies(cfg))
    if cfg.prune != "none" or cfg.share_weights:
        strategy = ProjectModel(strategy, **_compaction(cfg, model))
    strategy = DecodeUpdates(strategy, seed=cfg.seed, codec_up=parse_codec(cfg.codec),
                             codec_down=parse_codec(cfg.codec_down))
    strategy = ClientReports(ValidateReplies(strategy), partitions)
    if cfg.devices:
        from smallfed.devices import RoundClock, training_flops_per_sample

        clock = RoundClock(cfg, training_flops_per_sample(model, input_shape))
        strategy = DeviceClock(strategy, clock, partitions)
    strategy = PartitionSampling(
        strategy, partitions, clients_per_round=cfg.clients_per_round,
        fraction_evaluate=cfg.fraction_evaluate, seed=cfg.seed, poisson=poisson)
    return RoundOffset(strategy, done)


def _compaction(cfg: Config, model: nn.Module) -> dict:
    from smallfed.compact.pruning import ServerPruning
    from smallfed.compact.sharing import ServerSharing

    return {"pruning": ServerPruning(cfg, model) if cfg.prune != "none" else None,
            "sharing": ServerSharing(cfg, model) if cfg.share_weights else None}
