"""The run configuration: every key, its type, default and allowed values, in one place.

A run is configured by a flat table of hyphenated keys, the shape Flower uses for
``[tool.flwr.app.config]`` and ``run_config``, so a TOML file under
``simulations/``, ``--set KEY=VALUE`` on the command line and Flower's
``run_config`` all describe the same :class:`Config`. Everything is checked here,
before any work starts: an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` naming the key and what is allowed.

Checks that need the data (more clients than samples, a missing data folder) live
in :func:`smallfed.data.check_data_config`, which the command line calls before it
starts a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallfed.codec import CodecError, check_downlink, parse_codec


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the key and the fix."""


# Keys that say where and how a run executes, not what it computes: a checkpoint
# resumes, and a sweep point counts as finished, whatever they were.
RUNNING_KEYS = frozenset({"out-dir", "resume", "device", "cohort-size", "ray-address",
                          "client-gpus", "tracker"})


def _key(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """A validated run configuration. Attribute ``num_server_rounds`` is key ``num-server-rounds``."""

    # --- federation -------------------------------------------------------
    num_server_rounds: int = _key(5, "Federated rounds to run.", ge=1)
    num_clients: int = _key(20, "Virtual clients (data partitions) in the population.", ge=1)
    clients_per_round: int = _key(10, "Clients sampled for training each round.", ge=1)
    strategy: str = _key(
        "fedavg",
        "The strategy that aggregates the decoded updates: one of Flower's (registered in "
        "smallfed/flower/strategies.py), or package.module:function returning a Flower "
        "Strategy. Every one combines with codecs and pruning; privacy = 'user' needs fedavg or fedavgm.",
    )
    server_lr: float = _key(
        1.0, "Server learning rate (fedavgm: server_learning_rate; fedadam, fedyogi, "
        "fedadagrad: eta).", gt=0
    )
    server_momentum: float = _key(0.0, "Server momentum (fedavgm).", ge=0, lt=1)
    proximal_mu: float = _key(0.0, "Proximal term weight (fedprox).", ge=0)
    malicious_clients: int = _key(
        0, "krum, multikrum, bulyan: the hostile clients a round may hold (their f).", ge=0)
    trim_beta: float = _key(
        0.2, "fedtrimmedavg: the share cut from each end of every coordinate.", ge=0, lt=0.5)
    qfed_q: float = _key(0.1, "qfedavg: the fairness exponent q (0: FedAvg-like).", ge=0)
    update_clip: float = _key(
        0.0, "The largest L2 norm of a client's update (its model minus the model it was "
        "sent) the server aggregates; longer ones are scaled down. 0: adaptive, "
        "update-clip-factor times the median norm of the last 5 rounds' updates. Not used "
        "with privacy = 'user' (dp-clip bounds every update).", ge=0)
    update_clip_factor: float = _key(
        2.0, "Adaptive update clip: the bound as a multiple of the recent median norm "
        "(0 with update-clip 0: no bound, for research on attacks only).", ge=0)
    max_examples: int = _key(
        0, "The most examples a real device's reply may count for (the server cannot check "
        "its data); 0: 4 times the round's median claim. In simulation a claim above the "
        "client's partition size is rejected.", ge=0)
    min_replies: int = _key(
        1,
        "Fewest usable updates a round aggregates; with fewer the round fails (logged, "
        "global model unchanged) and the run goes on.",
        ge=1,
    )
    fraction_evaluate: float = _key(
        0.0,
        "Fraction of clients that also evaluate the global model on their own data "
        "each round (centralized evaluation on the held-out set always runs).",
        ge=0,
        le=1,
    )
    seed: int = _key(
        42, "Seed of the model init, the partitioning, client sampling and local shuffling."
    )

    # --- data ---------------------------------------------------------------
    dataset: str = _key(
        "digits",
        "digits (scikit-learn, ships with the package), mnist (IDX files in data-dir), "
        "hf:<name> (a Hugging Face dataset through flwr-datasets; needs the internet), "
        "or package.module:function for your own (see README).",
    )
    data_dir: str = _key("", "Folder of the mnist IDX files (.gz or raw).")
    test_fraction: float = _key(
        0.2, "Share of digits held out for centralized evaluation.", gt=0, lt=1
    )
    partitioner: str = _key(
        "dirichlet",
        "How client data is split (flwr-datasets partitioners).",
        choices=("iid", "dirichlet", "pathological", "shard"),
    )
    alpha: float = _key(0.5, "Dirichlet concentration; smaller is more non-IID.", gt=0)
    min_partition_size: int = _key(
        10, "Dirichlet: resample until every client has at least this many samples.", ge=0
    )
    classes_per_client: int = _key(2, "Pathological: classes each client holds.", ge=1)
    shards_per_client: int = _key(2, "Shard: label-sorted shards each client holds.", ge=1)

    # --- model and local training ------------------------------------------
    model: str = _key(
        "cnn-tiny",
        "A model of the zoo (smallfed.models), or package.module:function returning an "
        "nn.Module for (input_shape, num_classes).",
    )
    local_epochs: int = _key(1, "Local epochs per round.", ge=1)
    batch_size: int = _key(32, "Local batch size.", ge=1)
    optimizer: str = _key("sgd", "Client optimizer.", choices=("sgd", "adam"))
    lr: float = _key(0.05, "Client learning rate.", gt=0)
    momentum: float = _key(0.9, "Client SGD momentum (reset every round).", ge=0, lt=1)
    weight_decay: float = _key(0.0, "Client weight decay.", ge=0)

    # --- compression ----------------------------------------------------------
    codec: str = _key(
        "none",
        "Uplink codec: the chain each client's update (its model delta) goes through, "
        "e.g. 'topk:0.01,quantize:4,error_feedback' (stages: smallfed/codec/chain.py).",
    )
    codec_down: str = _key(
        "none", "Downlink codec for the global model the server broadcasts, e.g. 'fp16'."
    )

    # --- compaction -----------------------------------------------------------
    prune: str = _key(
        "none",
        "Federated magnitude pruning, decided by the server each round: none; unstructured "
        "(global L1 over every Conv/Linear weight); structured (whole output channels by "
        "L2 norm, layer by layer). Clients send only the unpruned coordinates.",
        choices=("none", "unstructured", "structured"),
    )
    prune_sparsity: float = _key(
        0.5, "Pruning: at the end of the schedule, the share of Conv/Linear weights pruned "
        "(unstructured), or of each layer's channels (structured; the next layer loses their "
        "inputs too, so more weights are zero).", ge=0, lt=1)
    prune_start_round: int = _key(1, "Pruning: the first round that trains a pruned model.", ge=1)
    prune_end_round: int = _key(
        0, "Pruning: the round that reaches prune-sparsity (Zhu and Gupta's cubic schedule); "
        "0: half of num-server-rounds.", ge=0)

    qat_rounds: int = _key(
        0, "Quantization-aware training: the last N rounds train through int8 rounding "
        "(the int8 export's scheme), so `smallfed export --int8` loses less.", ge=0)

    share_weights: int = _key(
        0, "Weight sharing (Deep Compression): in the last share-rounds rounds every "
        "Conv/Linear weight tensor holds at most this many distinct values (2..256; 0: off), "
        "clustered by the server and fine-tuned by the clients.", ge=0, le=256)
    share_rounds: int = _key(
        5, "Weight sharing: the last rounds, which fine-tune the shared values.", ge=1)
    share_lr: float = _key(
        1e-4, "Weight sharing: the clients' learning rate in the share rounds. A shared "
        "value's gradient sums those of all its weights (thousands), so it is far below lr.",
        gt=0)
    export: str = _key(
        "none", "After the run, export the final model to ONNX in the run folder: none, fp32 "
        "(model.onnx) or int8 (model.int8.onnx); see `smallfed export`.",
        choices=("none", "fp32", "int8"))

    # --- devices --------------------------------------------------------------
    devices: str = _key(
        "", "Simulated device population, e.g. 'phone-high:0.2,phone-low:0.5,rpi4:0.2,iot:0.1' "
        "(profiles: smallfed/devices/profiles.py); a client's device follows from its "
        "partition id and the seed. Empty: no device simulation.")
    round_deadline_s: float = _key(
        0.0, "Devices: simulated seconds a round waits; later replies are stragglers' and "
        "are dropped (0: no deadline).", ge=0)
    target_accuracy: float = _key(
        0.97, "Devices: the accuracy whose simulated time-to-target results.json reports.",
        gt=0, le=1)

    subspace: float = _key(
        0.0,
        "A shared random subspace: each round every client keeps the same random fraction "
        "of each tensor's coordinates (positions from the round's seed, none sent); under "
        "DP the clipping and noise act in that subspace only, so the noise scales with its "
        "size (0: off).", ge=0, lt=1)

    # --- secure aggregation --------------------------------------------------
    secure_aggregation: bool = _key(
        False,
        "SecAgg+ (Bell et al. 2020): each client clips its update, encodes it as integers "
        "(secagg-bits a coordinate) and masks it, so the server learns only the sum of the "
        "round's cohort. With privacy = 'user' the clients add the noise (distributed "
        "discrete Gaussian), so the server never sees an update in the clear; with privacy "
        "= 'none' each update is clipped to update-clip. README 'Secure aggregation'.")
    secagg_bits: int = _key(
        16, "Secure aggregation: bits per coordinate (the secure sum is taken modulo "
        "2^bits); the encoding's scale is chosen so that the cohort's sum fits.", ge=2, le=62)
    secagg_max_dropout: float = _key(
        1 / 3,
        "Secure aggregation: the share of a round's cohort that may drop and the round "
        "still aggregates; each client's noise assumes only the rest survive, and fewer "
        "survivors fail the round.", ge=0, lt=1)
    secagg_timeout_s: float = _key(
        120.0, "Secure aggregation: how long each of the protocol's key, share and unmask "
        "exchanges waits for replies (the training exchange waits as any round).", gt=0)

    # --- privacy --------------------------------------------------------------
    privacy: str = _key(
        "none",
        "none; sample: sample-level DP on every client (Opacus DP-SGD, accountant kept "
        "across rounds); user: user-level DP-FedAvg (Poisson client sampling, the server "
        "clips each update to dp-clip and adds noise dp-noise * dp-clip to the sum).",
        choices=("none", "sample", "user"),
    )
    dp_noise: float = _key(1.0, "DP-SGD noise multiplier (noise std / clip norm).", ge=0)
    dp_clip: float = _key(1.0, "DP-SGD per-sample gradient clip norm.", gt=0)
    dp_delta: float = _key(1e-5, "The delta of the (epsilon, delta) guarantee.", gt=0, lt=1)
    dp_physical_batch: int = _key(
        0,
        "privacy = sample: the most samples DP-SGD holds at once (Opacus's "
        "BatchMemoryManager): the expected batch batch-size is split into physical "
        "batches of at most this many, one noisy step per logical batch, so devices train "
        "with batches larger than their memory allows (0: no split).", ge=0)
    dp_target_epsilon: float = _key(
        0.0,
        "If > 0, each client computes the noise that spends this epsilon over its planned "
        "rounds (see dp-plan-quantile) and local epochs.",
        ge=0,
    )
    dp_plan_quantile: float = _key(
        0.5,
        "Target-epsilon mode: a client plans its budget for this quantile of the rounds it "
        "will be sampled in (Binomial(rounds, clients-per-round / num-clients)); higher "
        "means more noise per round and fewer clients out of budget before the end.",
        gt=0, lt=1,
    )
    dp_budget: float = _key(
        0.0,
        "A client declines to train once the round would take its epsilon past this "
        "(0: the target epsilon, or no budget).",
        ge=0,
    )
    dp_clip_mode: str = _key(
        "fixed",
        "privacy = user: fixed clip, or adaptive (Andrew et al. 2021: the clip follows the "
        "dp-clip-quantile of update norms, estimated with noise; dp-clip is its start).",
        choices=("fixed", "adaptive"),
    )
    dp_clip_quantile: float = _key(
        0.5, "Adaptive clipping: the share of updates that should be left unclipped.", ge=0, le=1)
    dp_clip_lr: float = _key(0.2, "Adaptive clipping: geometric learning rate of the clip.", gt=0)
    dp_clip_count_stddev: float = _key(
        0.0, "Adaptive clipping: noise on the unclipped count (0: expected clients / 20).", ge=0)
    dp_secure_rng: bool = _key(
        False,
        "Secure mode, both privacy levels: DP noise and DP sampling read the OS's "
        "cryptographic generator (os.urandom), never a seed, and the noise is an exact "
        "discrete Gaussian on a grid of sigma/65536, added in integers, so no "
        "floating-point attack on the sampler applies (README 'Secure mode'). About 2x "
        "slower DP-SGD steps. Off: fresh OS entropy seeds numpy's and torch's fast, "
        "non-cryptographic generators.",
    )
    dp_reproducible: bool = _key(
        False,
        "Draw the DP noise and DP sampling from the run's seed, so private runs repeat "
        "exactly: for research only, since anyone who knows the seed can remove the noise. "
        "Off: fresh OS entropy every run.",
    )
    dp_accountant: str = _key(
        "prv", "Opacus accountant: prv (tightest; within 0.011 above Google's PLD) or rdp "
        "(8-30% above). gdp is refused: it under-reports.", choices=("prv", "rdp"))
    dp_publish_sample: bool = _key(
        False,
        "privacy = user: write clients.csv (which clients each round's secret Poisson "
        "sample drew, and their timings). For research only: amplification by sampling "
        "assumes the sample stays secret, so publishing it voids the reported epsilon.",
    )

    # --- running ------------------------------------------------------------
    plugins: str = _key(
        "", "Your modules, comma-separated, imported before the rest of the configuration "
        "is checked, in every process of the run (ServerApp, ClientApps, Ray's workers): "
        "where your @register_stage, @register_dataset, @register_strategy and device "
        "profiles live. Under `flwr run` list their files in fab-include.")
    backend: str = _key(
        "inprocess",
        "inprocess: one process drives the ServerApp and ClientApp through an in-process "
        "Grid (fastest on one machine); ray: Flower's Simulation Engine (large "
        "populations, several cores or machines).",
        choices=("inprocess", "ray"),
    )
    client_cpus: float = _key(1.0, "ray: CPUs reserved per virtual client.", gt=0)
    client_gpus: float = _key(
        0.0, "ray: GPUs reserved per virtual client (0.25: four clients share a GPU).", ge=0)
    ray_address: str = _key(
        "", "ray: the address of a running Ray cluster (host:port of `ray start --head`); "
        "empty starts a local Ray instance.")
    cohort_size: int = _key(
        0, "inprocess: clients of a round trained together as one batched computation, "
        "at most this many at once (0: one after another; on ray, each actor trains its own). Features the batch cannot "
        "hold (adam, QAT, weight sharing, secure RNG, BatchNorm) train one "
        "after another, and the run says so once.", ge=0)
    device: str = _key(
        "cpu", "Where the cohort engine trains: cpu, cuda, or auto (cuda when present).",
        choices=("cpu", "cuda", "auto"))
    resume: bool = _key(
        False, "Go on from the checkpoint in out-dir (same configuration): for a ServerApp "
        "restarted with `flwr run` (`smallfed simulate --resume DIR` does it for simulations).")
    out_dir: str = _key(
        "", "Where results.json and rounds.csv go when run by `flwr run` (--out wins)."
    )
    tracker: str = _key(
        "none", "Also send every round's metrics and the summary to an experiment tracker: "
        "tensorboard (event files in OUT/tensorboard; pip install \"smallfed[tensorboard]\"), "
        "wandb or mlflow (their own settings and environment variables apply). A tracker "
        "that fails mid-run warns and stops; results.json stays the record.",
        choices=("none", "tensorboard", "wandb", "mlflow"))

    def __post_init__(self) -> None:
        if self.dp_accountant == "gdp":
            raise ConfigError(
                "dp-accountant: gdp (Opacus's central-limit approximation) under-reports "
                "epsilon, by up to 40% against Google's PLD accountant "
                "(tests/test_accounting.py), and picks too little noise for a target; use "
                "prv (tight, never below) or rdp")
        if self.plugins:
            from smallfed.plugins import import_plugins  # it imports this module

            import_plugins(self.plugins)
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round: {self.clients_per_round} is more than num-clients "
                f"({self.num_clients}); use at most {self.num_clients}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed: {self.seed} is not allowed; it must be >= 0")
        if self.qat_rounds > self.num_server_rounds:
            raise ConfigError(f"qat-rounds: {self.qat_rounds} is more than num-server-rounds "
                              f"({self.num_server_rounds})")
        if self.share_weights:
            if self.share_weights < 2 or self.share_rounds > self.num_server_rounds:
                raise ConfigError(
                    f"share-weights: {self.share_weights} shared values over share-rounds "
                    f"{self.share_rounds}: use 2..256 values and at most num-server-rounds "
                    f"({self.num_server_rounds}) rounds")
            if self.privacy == "sample" or self.qat_rounds:
                raise ConfigError(
                    "share-weights: the shared values are fine-tuned with summed gradients, "
                    "which DP-SGD's per-sample clipping and QAT's fake quantization replace; "
                    "set privacy != 'sample' and qat-rounds = 0, or share-weights = 0")
        if self.privacy == "sample" and self.fraction_evaluate > 0:
            raise ConfigError(
                f"fraction-evaluate: {self.fraction_evaluate} asks private clients for loss and "
                "accuracy on their own data, which DP-SGD does not noise and the accountant "
                "does not count; set fraction-evaluate = 0 (the server always evaluates on "
                "its held-out set)")
        if self.dp_secure_rng and self.dp_reproducible:
            raise ConfigError(
                "dp-secure-rng: secure mode draws noise no seed can repeat, and dp-reproducible "
                "draws it from the run's seed; set one of them to false")
        if self.qat_rounds and self.privacy == "sample":
            raise ConfigError("qat-rounds: quantization-aware training cannot run under "
                              "DP-SGD (Opacus's per-sample gradients need plain Conv/Linear "
                              "weights); set qat-rounds = 0 or privacy = 'user'/'none'")
        if self.prune_end_round and not (
            self.prune_start_round <= self.prune_end_round <= self.num_server_rounds
        ):
            raise ConfigError(
                f"prune-end-round: {self.prune_end_round} must lie between prune-start-round "
                f"({self.prune_start_round}) and num-server-rounds ({self.num_server_rounds})"
            )
        if self.min_replies > self.clients_per_round:
            raise ConfigError(
                f"min-replies: {self.min_replies} is more than clients-per-round "
                f"({self.clients_per_round}); no round could succeed"
            )
        if self.secure_aggregation:
            self._check_secure_aggregation()
        from smallfed.flower.strategies import check_strategy  # it imports this module

        check_strategy(self)
        if self.devices:
            from smallfed.devices.profiles import parse_mix  # here: smallfed.devices imports config

            try:
                parse_mix(self.devices)
            except ValueError as err:
                raise ConfigError(f"devices: {err}") from err
        if self.dataset == "mnist" and not self.data_dir:
            raise ConfigError(
                "data-dir: dataset 'mnist' needs the folder of its IDX files, "
                "for example data-dir = '../shared/data/mnist'"
            )
        for key, text in (("codec", self.codec), ("codec-down", self.codec_down)):
            try:
                parse_codec(text)
            except CodecError as err:
                raise ConfigError(f"{key}: {err}") from err
        try:
            check_downlink(parse_codec(self.codec_down))
        except CodecError as err:
            raise ConfigError(f"codec-down: {err}") from err
        # Here, not at the top: the registry's module imports this one (and torch).
        from smallfed.data.datasets import check_dataset_name

        check_dataset_name(self.dataset)

    def _check_secure_aggregation(self) -> None:
        """What secure aggregation cannot run with: the server sees only a sum."""
        if self.privacy == "sample":
            raise ConfigError(
                "secure-aggregation: with privacy = 'sample' each client already noises its "
                "own update; secure aggregation runs with privacy = 'user' (the clients add "
                "the noise together) or 'none'")
        if self.privacy == "none" and self.update_clip <= 0:
            raise ConfigError(
                "update-clip: secure aggregation needs a fixed bound on each update (the "
                "server cannot see norms to choose one); set update-clip > 0, e.g. 1.0")
        if self.privacy == "user" and self.dp_clip_mode == "adaptive":
            raise ConfigError(
                "dp-clip-mode: adaptive clipping counts unclipped updates on the server, "
                "which secure aggregation hides; set dp-clip-mode = 'fixed'")
        if self.strategy not in ("fedavg", "fedavgm"):
            raise ConfigError(
                f"strategy: secure aggregation releases only the cohort's sum, so "
                f"{self.strategy!r} (which needs each update) cannot run on it; use fedavg "
                "or fedavgm")
        for key, value in (("codec", self.codec), ("codec-down", self.codec_down)):
            if not parse_codec(value).is_identity:
                raise ConfigError(
                    f"{key}: secure aggregation sends its own integer encoding (secagg-bits "
                    f"a coordinate) instead of a codec; set {key} = 'none' and use subspace "
                    "to send fewer coordinates")
        if self.prune != "none" or self.share_weights or self.qat_rounds:
            raise ConfigError(
                "secure-aggregation: pruning, weight sharing and QAT are not supported with "
                "it yet; set prune = 'none', share-weights = 0 and qat-rounds = 0")
        if self.fraction_evaluate > 0:
            raise ConfigError(
                f"fraction-evaluate: {self.fraction_evaluate} asks clients for loss, accuracy "
                "and example counts on their own data, in the clear, which secure "
                "aggregation exists to avoid; set fraction-evaluate = 0 (the server always "
                "evaluates on its held-out set)")
        if self.min_replies > 1:
            raise ConfigError(
                "min-replies: secure aggregation sets its own floor (at least "
                "(1 - secagg-max-dropout) of each cohort); leave min-replies at 1")
        if self.num_clients >= 1 << 16:
            raise ConfigError(f"num-clients: {self.num_clients}: secure aggregation numbers a "
                              "cohort's parties in 16 bits; use fewer than 65,536 clients")
        if math.ceil((1 - self.secagg_max_dropout) * self.clients_per_round) < 3:
            raise ConfigError(
                f"clients-per-round: {self.clients_per_round} with secagg-max-dropout "
                f"{self.secagg_max_dropout:g} may leave fewer than 3 updates in a sum, which "
                "would reveal too much of each; sample more clients a round")

    # --- construction -------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Config:
        """Build from hyphenated keys (TOML, Flower run_config); unknown keys fail."""
        known = {_hyphen(f.name): f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                near = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(
                    f"{key}: unknown key{near} Run `smallfed keys` for the list."
                )
            kwargs[known[key].name] = _coerce(known[key], value)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
        """Read a run configuration file, then apply ``overrides`` (``--set``)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err
        values.update(overrides or {})
        return cls.from_mapping(values)

    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys and plain values: what results.json and Flower's run_config hold."""
        return {_hyphen(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from ``--set``; VALUE is read as a TOML value, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example num-server-rounds=3")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key: the documentation `smallfed keys` prints.

    Keys whose values come from a registry list what is registered now.
    """
    registered = _registered()
    rows = []
    for f in dataclasses.fields(Config):
        doc = f.metadata["doc"]
        choices = f.metadata["choices"] or registered.get(f.name)
        if choices:
            doc += f" [{' | '.join(choices)}]"
        rows.append((_hyphen(f.name), repr(f.default), doc))
    return rows


def _registered() -> dict[str, tuple[str, ...]]:
    """The names each registry holds (imported here: the zoo imports torch)."""
    from smallfed.data import DATASETS
    from smallfed.flower.strategies import STRATEGIES
    from smallfed.models import MODELS

    return {"model": tuple(MODELS), "strategy": tuple(STRATEGIES), "dataset": tuple(DATASETS)}


def _hyphen(name: str) -> str:
    return name.replace("_", "-")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(
            f"{_hyphen(f.name)}: expected {_TYPE_NAMES[kind]}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _check_value(f: dataclasses.Field[Any], value: Any) -> None:
    key, meta = _hyphen(f.name), f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    bounds = [
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, holds, sign in bounds:
        bound = meta[name]
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be {sign} {bound}")
