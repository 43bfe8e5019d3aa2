"""The registry of inner strategies: Flower 1.42's own Message-API strategies, by name.

The server's layers (:mod:`smallfed.flower.layers`) sample, validate, decode and
project; the inner strategy only turns the round's replies (each a full client model
by then) into the next global model. Every built-in one is Flower's own class with its
node sampling switched off (fractions of 1, no minimums): the sampling layer has
already chosen the nodes it shows.

Adding a strategy is one entry here, or ``@register_strategy`` in your own module::

    @register_strategy("fedmine", user_dp=False)
    def fedmine(cfg: Config) -> Strategy:
        return MyStrategy(**NO_SAMPLING)

What a strategy combines with:

* codecs and pruning: all of them. The decoding layer hands the inner strategy
  whole models, and the projection layer masks (and re-shares) whatever it returns.
* ``privacy = "user"``: only ``fedavg``. DP-FedAvg's step (clip, sum, noise, divide by
  the expected count) replaces the inner aggregation; a median, a trimmed mean or
  Krum's selection has another sensitivity, which the accountant does not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from smallfed.config import Config, ConfigError

StrategyFactory = Callable[[Config], Strategy]

# Flower's strategies sample nodes themselves; ours must take every node they are shown.
NO_SAMPLING = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0,
                   min_evaluate_nodes=0, min_available_nodes=0)


@dataclass(frozen=True)
class StrategyEntry:
    """A named strategy: how to build it, and what it combines with."""

    name: str
    factory: StrategyFactory
    doc: str
    user_dp: bool = False  # may run under privacy = "user"
    min_replies: Callable[[Config], int] | None = None  # fewest replies it can aggregate
    metrics: tuple[str, ...] = ()  # reply metrics it needs, each finite and >= 0


STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(
    name: str, doc: str = "", *, user_dp: bool = False,
    min_replies: Callable[[Config], int] | None = None, metrics: tuple[str, ...] = (),
) -> Callable[[StrategyFactory], StrategyFactory]:
    """Add a strategy factory ``(cfg) -> Strategy`` under ``name`` (a name not taken)."""
    if name in STRATEGIES or ":" in name:
        raise ValueError(f"strategy name {name!r}: taken, or holds ':'; choose another")

    def add(factory: StrategyFactory) -> StrategyFactory:
        STRATEGIES[name] = StrategyEntry(name, factory, doc or (factory.__doc__ or "").strip(),
                                         user_dp, min_replies, metrics)
        return factory

    return add


def strategy_entry(name: str) -> StrategyEntry:
    """The registered strategy ``name``; ConfigError naming the known ones if none."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy: {name!r} is not known; use one of "
                          f"{', '.join(STRATEGIES)} (or pass your own through the Python API)")
    return STRATEGIES[name]


def check_strategy(cfg: Config) -> None:
    """Refuse, before the run, a strategy that cannot run with the rest of ``cfg``.

    A researcher's own (``package.module:function``, or an object given to
    :func:`smallfed.simulate`) is imported only when the run builds it.
    """
    own = ":" in cfg.strategy
    if cfg.privacy == "user" and (own or not strategy_entry(cfg.strategy).user_dp):
        usable = ", ".join(n for n, e in STRATEGIES.items() if e.user_dp)
        raise ConfigError(
            f"strategy: DP-FedAvg (privacy = 'user') averages with its own clipped, noised "
            f"step; {cfg.strategy!r} is not supported with it, use {usable}")
    if cfg.privacy == "sample" and not own and strategy_entry(cfg.strategy).metrics:
        needs = ", ".join(strategy_entry(cfg.strategy).metrics)
        raise ConfigError(
            f"strategy: {cfg.strategy} needs the clients' {needs}, which private clients do "
            "not send (it is not noised or accounted); use another strategy under "
            "privacy = 'sample'")
    if not own and cfg.clients_per_round < fewest_replies(cfg):
        raise ConfigError(
            f"clients-per-round: {cfg.strategy} with malicious-clients = "
            f"{cfg.malicious_clients} needs at least {fewest_replies(cfg)} replies a round; "
            "raise clients-per-round or lower malicious-clients")


def fewest_replies(cfg: Config) -> int:
    """The fewest replies a round of ``cfg.strategy`` aggregates (min-replies, or more
    where the strategy needs more: a round with fewer fails, logged, and the run goes on)."""
    entry = strategy_entry(cfg.strategy) if ":" not in cfg.strategy else None
    need = entry.min_replies(cfg) if entry and entry.min_replies else 1
    return max(cfg.min_replies, need)


OBJECT_PREFIX = "object:"  # the strategy value of a run given a strategy object


def required_metrics(cfg: Config) -> tuple[str, ...]:
    """The reply metrics ``cfg.strategy`` needs (each finite and >= 0)."""
    return STRATEGIES[cfg.strategy].metrics if cfg.strategy in STRATEGIES else ()


def make_inner_strategy(cfg: Config) -> Strategy:
    """The strategy ``cfg.strategy`` names; it sees only the nodes the layers sampled.

    ``package.module:function`` is called with the Config and must return a Flower
    Strategy that takes every node it is shown (see :data:`NO_SAMPLING`).
    """
    if ":" not in cfg.strategy:
        return strategy_entry(cfg.strategy).factory(cfg)
    if cfg.strategy.startswith(OBJECT_PREFIX):
        raise ConfigError(
            f"strategy: this run's strategy was a Python object ({cfg.strategy[len(OBJECT_PREFIX):]}) "
            "given to smallfed.simulate; go on with smallfed.simulate(..., strategy=<that "
            "object>, resume=True), not from the command line")
    from smallfed.plugins import load_object

    strategy = load_object(cfg.strategy, what="strategy")(cfg)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy: {cfg.strategy} returned {type(strategy).__name__}, not a "
                          "flwr.serverapp.strategy.Strategy")
    return strategy


@register_strategy("fedavg", "FedAvg: the average weighted by num-examples.", user_dp=True)
def fedavg(cfg: Config) -> Strategy:
    return FedAvg(**NO_SAMPLING)


@register_strategy("fedavgm", "FedAvgM: server momentum (server-lr, server-momentum); under "
                   "privacy = 'user', DP-FedAvg with server momentum.", user_dp=True)
def fedavgm(cfg: Config) -> Strategy:
    return FedAvgM(**NO_SAMPLING, server_learning_rate=cfg.server_lr,
                   server_momentum=cfg.server_momentum)


@register_strategy("fedprox", "FedProx: clients add a proximal term (proximal-mu).")
def fedprox(cfg: Config) -> Strategy:
    return FedProx(**NO_SAMPLING, proximal_mu=cfg.proximal_mu)


@register_strategy("fedadam", "FedAdam: server Adam (eta = server-lr).")
def fedadam(cfg: Config) -> Strategy:
    return FedAdam(**NO_SAMPLING, eta=cfg.server_lr, eta_l=cfg.lr)


@register_strategy("fedyogi", "FedYogi: server Yogi (eta = server-lr).")
def fedyogi(cfg: Config) -> Strategy:
    return FedYogi(**NO_SAMPLING, eta=cfg.server_lr, eta_l=cfg.lr)


@register_strategy("fedadagrad", "FedAdagrad: server Adagrad (eta = server-lr).")
def fedadagrad(cfg: Config) -> Strategy:
    return FedAdagrad(**NO_SAMPLING, eta=cfg.server_lr, eta_l=cfg.lr)


@register_strategy("fedmedian", "FedMedian: the coordinate-wise median (robust).")
def fedmedian(cfg: Config) -> Strategy:
    return FedMedian(**NO_SAMPLING)


@register_strategy("fedtrimmedavg", "FedTrimmedAvg: the mean without the trim-beta "
                   "largest and smallest values of each coordinate (robust).")
def fedtrimmedavg(cfg: Config) -> Strategy:
    return FedTrimmedAvg(**NO_SAMPLING, beta=cfg.trim_beta)


@register_strategy("krum", "Krum: the one update closest to its n - f - 2 neighbours "
                   "(robust; f = malicious-clients).",
                   min_replies=lambda cfg: 2 * cfg.malicious_clients + 3 if cfg.malicious_clients else 1)
def krum(cfg: Config) -> Strategy:
    return Krum(**NO_SAMPLING, num_malicious_nodes=cfg.malicious_clients)


@register_strategy("multikrum", "MultiKrum: the average of the n - f updates Krum scores "
                   "best (robust; f = malicious-clients).",
                   min_replies=lambda cfg: 2 * cfg.malicious_clients + 3 if cfg.malicious_clients else 1)
def multikrum(cfg: Config) -> Strategy:
    keep = max(1, cfg.clients_per_round - cfg.malicious_clients)
    return MultiKrum(**NO_SAMPLING, num_malicious_nodes=cfg.malicious_clients,
                     num_nodes_to_select=keep)


@register_strategy("bulyan", "Bulyan: MultiKrum's selection, then a trimmed mean "
                   "(robust; needs 4f + 3 replies, f = malicious-clients).",
                   min_replies=lambda cfg: 4 * cfg.malicious_clients + 3)
def bulyan(cfg: Config) -> Strategy:
    return Bulyan(**NO_SAMPLING, num_malicious_nodes=cfg.malicious_clients)


@register_strategy("qfedavg", "q-FedAvg: fairer accuracy across clients (q = qfed-q; the "
                   "client learning rate is lr).", metrics=("train-loss",))
def qfedavg(cfg: Config) -> Strategy:
    return QFedAvg(**NO_SAMPLING, client_learning_rate=cfg.lr, q=cfg.qfed_q,
                   train_loss_key="train-loss")
