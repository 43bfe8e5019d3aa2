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
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    load_record,
    model_shape,
    model_to_record,
)
from smallfed.models import build_model
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
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"this node's labels run from {int(y.min())} to {int(y.max())}, the "
                         f"model has {num_classes} classes (0 to {num_classes - 1})")


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

    @app.train(mods=[make_codec_mod(chains)])
    def handle_train(msg: Message, context: Context) -> Message:
        config = config_of(context)
        model = load_record(fresh_model(config, msg), msg.content[ARRAYS_KEY])
        x, y = client_data(config, context)
        check_data(msg, x, y)
        server_round = int(msg.content["config"]["server-round"])
        masks = read_masks(msg.content, model_template(config, msg))
        refusal = memory_refusal(config, context, model, tuple(x.shape[1:]))
        if refusal:
            return decline(msg, refusal)
        if config.privacy == "sample":  # user-level DP is the server's work
            return train_with_dp(msg, context, config, model, x, y, server_round, masks)
        mu = float(msg.content["config"].get("proximal-mu", 0.0))
        gen = client_generator(config.seed, server_round, client_key(context))
        shared = []
        if is_share_round(config, server_round):
            shared, config = shared_names(model), config.replace(lr=config.share_lr)
        with (torch_threads(CLIENT_THREADS), masked_training(model, masks),
              fake_quantized(model, is_qat_round(config, server_round)),
              shared_training(model, shared)):
            result = train(model, x, y, config, gen, proximal_mu=mu)
        metrics = MetricRecord({"train-loss": result.loss, NUM_EXAMPLES_KEY: result.num_examples})
        content = RecordDict({ARRAYS_KEY: model_to_record(model), METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def handle_evaluate(msg: Message, context: Context) -> Message:
        config = config_of(context)
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

    return app


DP_HISTORY_KEY = "smallfed-dp-history"


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


def train_with_dp(
    msg: Message, context: Context, config: Config, model: torch.nn.Module,
    x: torch.Tensor, y: torch.Tensor, server_round: int, masks: Masks,
) -> Message:
    """A DP-SGD round whose accountant history persists in the node's Context.state."""
    # Imported here: opacus costs a device about 115 MB resident, and only DP-SGD needs it.
    from smallfed.privacy.local_dp import train_private  # pylint: disable=import-outside-toplevel

    saved = context.state.get(DP_HISTORY_KEY)
    history = [] if saved is None else list(zip(
        saved["noise"], saved["rate"], [int(s) for s in saved["steps"]]))
    # The noise must be secret: OS entropy, unless the run asks to be reproducible.
    seed = secrets.randbits(63) if not config.dp_reproducible else int(np.random.SeedSequence(
        [config.seed, server_round, client_key(context) + 1, 7]).generate_state(1)[0])
    with torch_threads(CLIENT_THREADS), masked_training(model, masks):
        outcome = train_private(model, x, y, config, seed, history, masks)
    noise, rate, steps = zip(*outcome.history) if outcome.history else ((), (), ())
    context.state[DP_HISTORY_KEY] = ConfigRecord(
        {"noise": list(noise), "rate": list(rate), "steps": list(steps)})
    if outcome.result is None:
        return decline(msg, outcome.declined_reason, epsilon=outcome.epsilon)
    metrics = MetricRecord({
        "train-loss": outcome.result.loss, NUM_EXAMPLES_KEY: outcome.result.num_examples,
        "epsilon": outcome.epsilon, "noise-multiplier": outcome.noise_multiplier,
    })
    content = RecordDict({ARRAYS_KEY: model_to_record(model), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)
