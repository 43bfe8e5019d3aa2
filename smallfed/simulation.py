"""Run a simulation: the same ServerApp and ClientApp on the in-process Grid or on Ray.

``backend = "inprocess"`` (default) suits one machine: it has no start-up cost and no
polling (see BENCHMARKS.md for the overhead against a plain torch loop).
``backend = "ray"`` runs Flower's Simulation Engine: use it when clients should run in
parallel on many cores or several machines, or for populations where per-client
isolation matters.
"""

from __future__ import annotations

import json
import logging
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from flwr.app import Message, MessageType
from flwr.serverapp.strategy import Strategy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from smallfed.cohort.rendezvous import Cohort, resolve_device
from smallfed.config import Config, ConfigError
from smallfed.data import check_data_config
from smallfed.flower.checkpoint import check_resumable, out_dir_lock
from smallfed.flower.checkpoint import load as load_checkpoint
from smallfed.flower.checkpoint import require as require_checkpoint
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.server import RoundHook, build_server_app, refuse_finished
from smallfed.privacy import check_privacy_config
from smallfed.report.results import RoundRecord
from smallfed.report.trackers import check_tracker


class RoundProgress:
    """A rich progress bar over rounds, and one over the clients of the current round."""

    def __init__(self, cfg: Config, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), disable=not enabled, transient=False,
        )
        self.rounds = self.progress.add_task("rounds", total=cfg.num_server_rounds)
        self.clients = self.progress.add_task(
            "clients", total=cfg.clients_per_round, visible=cfg.backend == "inprocess")

    def on_round(self, record: RoundRecord, total: int) -> None:
        self.progress.update(
            self.rounds, completed=record.round,
            description=f"round {record.round}/{total}  accuracy {record.accuracy:.4f}",
        )
        self.progress.reset(self.clients)

    def on_reply(self, reply: Message) -> None:
        if reply.metadata.message_type == MessageType.TRAIN:
            self.progress.advance(self.clients)


@contextmanager
def quiet_flower(enabled: bool) -> Iterator[None]:
    """Keep Flower's per-round INFO logs out of the way of the progress bars."""
    logger = logging.getLogger("flwr")
    level = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def simulate(  # pylint: disable=too-many-arguments
    cfg: Config, out_dir: str | Path, progress: bool = True, resume: bool = False,
    on_round: RoundHook | None = None, *, overwrite: bool = False, inner: Strategy | None = None,
) -> dict[str, Any]:
    """Check the configuration and data, run the simulation, return results.json's content.

    ``resume`` goes on from the checkpoint in ``out_dir`` (same configuration only); a
    folder that already holds a run is refused unless ``overwrite``. ``inner`` replaces
    the configured strategy under the server's layers.
    """
    check_privacy_config(cfg, check_data_config(cfg))
    check_tracker(cfg.tracker)
    if cfg.cohort_size > 1 and cfg.backend == "inprocess":
        resolve_device(cfg.device)  # a missing GPU fails here, before any work
    out = Path(out_dir)
    if resume:
        require_checkpoint(out)  # none there: say so before writing anything, even a lock
    with out_dir_lock(out):  # the checkpoint read below is the last one written
        if not resume:
            refuse_finished(out, overwrite)
        return _simulate(cfg, out, progress, resume, on_round, inner)


def _simulate(
    cfg: Config, out: Path, progress: bool, resume: bool, on_round: RoundHook | None,
    inner: Strategy | None,
) -> dict[str, Any]:
    checkpoint = load_checkpoint(out) if resume else None
    if checkpoint is not None:
        check_resumable(cfg, checkpoint)
    bar = RoundProgress(cfg, enabled=progress)
    if checkpoint is not None:
        bar.progress.update(bar.rounds, completed=checkpoint.round)

    def round_done(record: RoundRecord, total: int) -> None:
        bar.on_round(record, total)
        if on_round is not None:
            on_round(record, total)

    client_app = build_client_app(cfg)
    with quiet_flower(progress), bar.progress:
        if cfg.backend == "inprocess":
            cohort = (Cohort(resolve_device(cfg.device), torch.get_num_threads())
                      if cfg.cohort_size > 1 else None)
            grid = InProcessGrid(
                client_app, cfg.num_clients, run_config=cfg.to_dict(),
                on_reply=bar.on_reply, cohort=cohort, cohort_size=cfg.cohort_size,
            )
            if checkpoint is not None:
                grid.restore_node_states(checkpoint.clients)
            server_app = build_server_app(cfg, out, round_done, checkpoint, grid.node_states,
                                          inner)
            server_app(grid, grid.server_context())
        else:
            server_app = build_server_app(cfg, out, round_done, checkpoint, inner=inner)
            run_on_ray(cfg, server_app, client_app)
        bar.progress.update(bar.clients, visible=False)
    results_file = out / "results.json"
    if not results_file.is_file():
        raise RuntimeError(f"the simulation ended without writing {results_file}; see the log")
    if cfg.export != "none":
        from smallfed.compact.export import export_run

        name = "model.int8.onnx" if cfg.export == "int8" else "model.onnx"
        export_run(out, out / name, int8=cfg.export == "int8")
    return json.loads(results_file.read_text())


def run_on_ray(cfg: Config, server_app: Any, client_app: Any) -> None:
    """Flower's Simulation Engine with the Ray backend.

    ``run_simulation`` is Flower's Python entry point to the engine; it is marked
    deprecated in favour of ``flwr run``, which `flwr run .` here uses, but it is the
    one that runs app objects built in this process. With ``ray-address`` the backend's
    ``ray.init(**init_args)`` joins that cluster instead of starting a local Ray; the
    ServerApp runs here and the client actors on the cluster's nodes.
    """
    from flwr.simulation import run_simulation

    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.ray_address:
        check_ray_address(cfg.ray_address)  # before the ServerApp's thread starts
        init_args["address"] = cfg.ray_address
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": init_args,
    }
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
        backend_name="ray", backend_config=backend_config,
    )


def check_ray_address(address: str) -> None:
    """ConfigError unless something answers at ``address`` (host:port): ``ray.init``
    retries an address where nothing answers for minutes, with only log lines."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray-address: {address!r} is not host:port; give the address "
                          "`ray start --head` printed, e.g. ray-address = \"10.0.0.5:6379\"")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"ray-address: no Ray cluster answers at {address} ({err}); start its head "
            f"there (`ray start --head --port={port}`), or set ray-address = \"\" to run "
            "on a local Ray instance") from err
