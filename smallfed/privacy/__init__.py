"""Differential privacy: sample-level DP-SGD on clients (Opacus) and user-level DP-FedAvg."""

from __future__ import annotations

import warnings
from logging import WARNING

from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from smallfed.config import Config, ConfigError
from smallfed.data import FederatedData
from smallfed.models import build_model
from smallfed.privacy.local_dp import check_private_model, noise_for
from smallfed.privacy.user_dp import user_noise

# Opacus warns on every engine that its secure RNG is off; smallfed's default is the
# fast generator (seeded, reproducible), which the README states. Say it once.
warnings.filterwarnings("once", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


# What epsilon is for: the neighbouring datasets of each level (results.json says it).
NEIGHBOURING = {
    "sample": "add or remove one record of one client; the mechanism is planned for a public "
              "record count (the partition size the server's split assigned, or the "
              "device's declared dp-records), never for its true count",
    "user": "add or remove all the data of one client (one node); the sample of clients "
            "each round is secret",
}
# Distributed DP (secure aggregation): the relation Kairouz et al. 2021 and TensorFlow
# Federated account. A node that is absent also withholds its noise share, so under
# add/remove the sum's noise variance would move by 1/min-survivors as well: not counted.
ZERO_OUT = ("zero out all the data of one client (one node): its update replaced by zeros "
            "while it still takes part and adds its noise share; the sample of clients "
            "each round is secret from the models' readers, not from the server")


def codec_advice(cfg: Config) -> str:
    """A warning for a codec that fights DP-SGD, or '': magnitude top-k of a noised update
    picks the coordinates where the noise is largest and drops the signal elsewhere."""
    if cfg.privacy != "sample":
        return ""
    from smallfed.codec import parse_codec  # pylint: disable=import-outside-toplevel

    if not any(stage.name == "topk" for stage in parse_codec(cfg.codec).stages):
        return ""
    return (f"codec {cfg.codec!r}: magnitude top-k of a DP-SGD update keeps mostly noise "
            "(every coordinate carries noise, the largest are mostly noise); for fewer "
            "upload bytes under DP use subspace = F, a shared random subspace where DP-SGD "
            "clips and noises only the coordinates it sends")


def check_privacy_config(cfg: Config, data: FederatedData) -> None:
    """Fail before the run on DP settings that cannot work, saying what to change."""
    if cfg.privacy == "none":
        return
    if advice := codec_advice(cfg):
        log(WARNING, "smallfed: %s", advice)
    if cfg.privacy == "user":
        if cfg.dp_target_epsilon <= 0 and cfg.dp_noise == 0:
            raise ConfigError("dp-noise: 0 adds no noise and gives no privacy; set dp-noise > 0 "
                              "or dp-target-epsilon")
        try:
            noise = user_noise(cfg)
        except ValueError as err:
            raise ConfigError(f"dp-target-epsilon: {cfg.dp_target_epsilon} cannot be reached "
                              f"in {cfg.num_server_rounds} rounds ({err})") from err
        if cfg.dp_clip_mode == "adaptive":
            try:
                compute_adaptive_noise_params(noise, cfg.clients_per_round,
                                              cfg.dp_clip_count_stddev or None)
            except ValueError as err:
                raise ConfigError(f"dp-clip-count-stddev: {err}") from err
        return
    dataset = data.dataset
    check_private_model(build_model(cfg.model, dataset.input_shape, dataset.num_classes, 0))
    if cfg.dp_target_epsilon <= 0 and cfg.dp_noise == 0:
        raise ConfigError("dp-noise: 0 adds no noise and gives no privacy; set dp-noise > 0 "
                          "or dp-target-epsilon")
    if cfg.dp_target_epsilon > 0:
        for size in sorted({len(p) for p in data.partitions}):
            try:
                noise_for(cfg, size)
            except ValueError as err:
                raise ConfigError(
                    f"dp-target-epsilon: {cfg.dp_target_epsilon} cannot be reached by a "
                    f"client of {size} samples in the planned rounds ({err}); raise the "
                    "target, or lower local-epochs or num-server-rounds"
                ) from err
