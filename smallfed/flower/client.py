"""The ClientApp: local training on one client's data, wired into Flower's Message API.

In simulation a client's data is partition ``partition-id`` of the configured dataset
(Flower's node config). On a real device the node config names a ``data-dir`` whose
``data.npz`` holds arrays ``x`` (N, C, H, W, preprocessed float32) and ``y`` (N,);
:func:`smallfed.data.write_device_data` writes one from a partition. Either way the
model is built from the input shape and class count the server sends with each
message, so a device never touches the server's dataset.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from smallfed.codec import Chain, parse_codec
from smallfed.compact.pruning import Masks, masked_training, read_masks
from smallfed.compact.qat import fake_quantized, is_qat_round
from smallfed.compact.sharing import is_share_round, shared_names, shared_training
from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.devices import PROFILES, profile_of, training_memory_bytes
from smallfed.flower.codec_mod import client_key, make_codec_mod
from smallfed.flower.secagg import handle_keys, handle_shares, handle_unmask, make_secagg_mod
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    load_record,
    model_shape,
    model_to_record,
)
from smallfed.models import build_model
from smallfed.privacy.floor import DeviceFloor
from smallfed.privacy.ledger import Ledger, LedgerError, ledger_lock
from smallfed.privacy.subspace import round_subspace
from smallfed.training import CLIENT_THREADS, client_generator, evaluate, torch_threads, train


def client_data(cfg: Config, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's training data: its partition in simulation, its own folder on a device."""
    data_dir = context.node_config.get("data-dir")
    if data_dir:
        with np.load(Path(str(data_dir)) / "data.npz") as npz:
            return torch.from_numpy(npz["x"]).float(), torch.from_numpy(npz["y"]).long()
    return federated_data(cfg).client(partition_id(context))


def check_data(msg: Message, x: torch.Tensor, y: torch.Tensor) -> None:
    """ValueError (the node's reply becomes a failure the server logs) when this node's
    data does not fit the model the server sends: say so before training on it."""
    input_shape, num_classes = model_shape(msg)
    if tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"this node's samples have shape {tuple(x.shape[1:])}, the model "
                         f"takes {input_shape}: preprocess data.npz like the server's dataset")
    # The message names no label this node holds: the server must not learn them.
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"this node has labels outside 0 to {num_classes - 1}, the classes "
                         "of the model: relabel data.npz like the server's dataset")


def partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def fresh_model(config: Config, msg: Message) -> torch.nn.Module:
    """The configured model for the input shape and class count ``msg`` carries."""
    input_shape, num_classes = model_shape(msg)
    return build_model(config.model, input_shape, num_classes, config.seed)


def model_template(config: Config, msg: Message) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the model's tensors, the layout every payload must match."""
    return _template(config.model, *model_shape(msg))


@lru_cache(maxsize=8)
def _template(model: str, input_shape: tuple[int, ...], num_classes: int
              ) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in
            build_model(model, input_shape, num_classes, 0).state_dict().items()}


def build_client_app(cfg: Config | None = None) -> ClientApp:
    """The ClientApp. With ``cfg`` None it reads the configuration from Flower's run_config."""
    app = ClientApp()

    def config_of(context: Context) -> Config:
        return cfg if cfg is not None else Config.from_mapping(context.run_config)

    def chains(msg: Message, context: Context
               ) -> tuple[Chain, Chain, dict[str, tuple[int, ...]], int]:
        config = config_of(context)
        return (parse_codec(config.codec), parse_codec(config.codec_down),
                model_template(config, msg), config.seed)

    @app.train(mods=[make_secagg_mod(config_of, model_template), make_codec_mod(chains)])
    def handle_train(msg: Message, context: Context) -> Message:
        config = config_of(context)
        floor = DeviceFloor.of(context.node_config)
        if floor is not None and (reason := floor.mode_refusal(config)):
            return decline(msg, reason)
        model = load_record(fresh_model(config, msg), msg.content[ARRAYS_KEY])
        x, y = client_data(config, context)
        check_data(msg, x, y)
        server_round = int(msg.content["config"]["server-round"])
        masks = read_masks(msg.content, model_template(config, msg))
        refusal = memory_refusal(config, context, model, tuple(x.shape[1:]))
        if refusal:
            return decline(msg, refusal)
        if config.privacy == "sample":  # user-level DP is the server's work
            return train_with_dp(msg, context, config, model, x, y, server_round, masks, floor)
        mu = float(msg.content["config"].get("proximal-mu", 0.0))
        gen = client_generator(config.seed, server_round, client_key(context))
        shared = []
        if is_share_round(config, server_round):
            shared, config = shared_names(model), config.replace(lr=config.share_lr)
        with (torch_threads(CLIENT_THREADS), masked_training(model, masks),
              fake_quantized(model, is_qat_round(config, server_round)),
              shared_training(model, shared)):
            result = train(model, x, y, config, gen, proximal_mu=mu, masks=masks)
        metrics = MetricRecord({"train-loss": result.loss, NUM_EXAMPLES_KEY: result.num_examples})
        content = RecordDict({ARRAYS_KEY: model_to_record(model), METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def handle_evaluate(msg: Message, context: Context) -> Message:
        config = config_of(context)
        if config.secure_aggregation:
            raise ValueError("this run uses secure aggregation: nothing about this node's data "
                             "leaves in the clear, evaluation metrics included; set "
                             "fraction-evaluate = 0")
        if config.privacy == "sample" or DeviceFloor.of(context.node_config) is not None:
            # Evaluation metrics are data-dependent and not noised: nothing the accountant
            # counts may be released, so a private client never evaluates (the server
            # refuses such configs; this is the device's own line).
            raise ValueError("this node's data is private (sample-level DP or its own privacy "
                             "floor): it does not evaluate, since its metrics would leave "
                             "unaccounted; set fraction-evaluate = 0")
        model = load_record(fresh_model(config, msg), msg.content[ARRAYS_KEY])
        x, y = client_data(config, context)
        check_data(msg, x, y)
        with torch_threads(CLIENT_THREADS):
            loss, accuracy = evaluate(model, x, y)
        metrics = MetricRecord(
            {"eval-loss": loss, "eval-accuracy": accuracy, NUM_EXAMPLES_KEY: len(y)})
        return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)

    @app.query()
    def handle_query(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node trains on: -1 on a device, which trains on
        its own data folder (the server then checks no example count against its split)."""
        place = -1 if context.node_config.get("data-dir") else partition_id(context)
        metrics = MetricRecord({"partition-id": place})
        return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)

    @app.query("secagg_keys")
    def handle_secagg_keys(msg: Message, context: Context) -> Message:
        return handle_keys(msg, context, config_of(context))

    @app.query("secagg_shares")
    def handle_secagg_shares(msg: Message, context: Context) -> Message:
        return handle_shares(msg, context)

    @app.query("secagg_unmask")
    def handle_secagg_unmask(msg: Message, context: Context) -> Message:
        return handle_unmask(msg, context)

    return app


def decline(msg: Message, reason: str, **metrics: float) -> Message:
    """A reply that says, with a reason, that this client does not train this round."""
    record = MetricRecord({NUM_EXAMPLES_KEY: 0, "declined": 1, **metrics})
    status = ConfigRecord({"reason": reason})
    return Message(RecordDict({METRICS_KEY: record, "status": status}), reply_to=msg)


def memory_refusal(config: Config, context: Context, model: torch.nn.Module,
                   input_shape: tuple[int, ...]) -> str:
    """Why this device cannot train the model (too little memory), or ''.

    The device is the node config's ``device`` on real hardware, else the one its
    partition id draws from the simulated population.
    """
    name = str(context.node_config.get("device", ""))
    profile = PROFILES.get(name) if name else profile_of(config, partition_id(context))
    if profile is None:
        return ""
    need = training_memory_bytes(model, input_shape, config)  # type: ignore[arg-type]
    if need <= profile.memory_bytes:
        return ""
    return (f"training {config.model} with batch {config.batch_size} needs "
            f"{need / 2**20:.2f} MiB, device {profile.name} allows {profile.memory_bytes / 2**20:.2f}"
            " MiB; use a smaller model or batch")


def public_records(context: Context, num_examples: int) -> int:
    """The record count DP-SGD is planned for, one the server may know.

    In simulation, the partition's size: the server's own split assigned it. On a device,
    the ``dp-records`` its owner declared in the node config (``smallfed edge start``
    sets it). Never the device's count itself: even rounded, a count moves the sample
    rate when one record is added or removed at a boundary, outside the accountant.
    """
    declared = context.node_config.get("dp-records")
    if declared is None and context.node_config.get("data-dir"):
        raise ValueError("this device trains under sample-level DP but its node config declares "
                         "no dp-records (the public record count DP-SGD is planned for); "
                         "start it with `smallfed edge start --dp-records N`")
    if declared is None:
        return num_examples
    value = int(declared)  # type: ignore[arg-type]
    if value <= 0:
        raise ValueError(f"node config dp-records = {declared!r}: must be a positive count")
    return value


def train_with_dp(  # pylint: disable=too-many-arguments
    msg: Message, context: Context, config: Config, model: torch.nn.Module,
    x: torch.Tensor, y: torch.Tensor, server_round: int, masks: Masks,
    floor: DeviceFloor | None,
) -> Message:
    """A DP-SGD round, recorded in the device's ledger before the update leaves.

    The reply holds the noised model and only numbers the server can work out from public
    settings: the planned record count, the mechanism, and the ledger's epsilon. No
    training loss, no true count (see README, "Privacy: who is trusted").
    """
    # Imported here: opacus costs a device about 115 MB resident, and only DP-SGD needs it.
    # pylint: disable=import-outside-toplevel
    from smallfed.privacy.local_dp import epsilon_of, planned_step, train_private

    with ledger_lock(context):
        try:
            ledger = Ledger.open(context, must_exist=floor is not None)
        except LedgerError as err:
            return decline(msg, str(err))
        records = public_records(context, len(y))
        step = planned_step(config, records)
        if floor is not None and (reason := floor.refusal(config, ledger.history, step)):
            return decline(msg, reason, epsilon=epsilon_of(config, ledger.history))
        # The noise must be secret: OS entropy, unless the run asks to be reproducible.
        seed = secrets.randbits(63) if not config.dp_reproducible else int(
            np.random.SeedSequence([config.seed, server_round, client_key(context) + 1, 7])
            .generate_state(1)[0])
        with torch_threads(CLIENT_THREADS), masked_training(model, masks):
            outcome = train_private(
                model, x, y, config, seed, ledger.history, masks, records=records,
                subspace=round_subspace(msg.content["config"], model_template(config, msg)))
        if outcome.result is None:
            return decline(msg, outcome.declined_reason, epsilon=outcome.epsilon)
        ledger.add(context, step, run_id=msg.metadata.run_id)
    metrics = MetricRecord({
        NUM_EXAMPLES_KEY: records, "epsilon": outcome.epsilon,
        "noise-multiplier": step[0], "dp-sample-rate": step[1], "dp-steps": step[2],
        "dp-rounds": len(ledger.history),
    })
    content = RecordDict({ARRAYS_KEY: model_to_record(model), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)
