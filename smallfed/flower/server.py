"""The ServerApp: Flower's strategy loop with centralized evaluation and results files.

``strategy.start`` calls ``evaluate_fn`` before round 1 and after every round; that
is where a round is evaluated on the held-out test set, its traffic read off the
metered Grid, and its row recorded.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr.serverapp.strategy import Strategy

from smallfed.config import Config, ConfigError
from smallfed.data import FederatedData, federated_data
from smallfed.flower.checkpoint import CHECKPOINT_DIR, Checkpoint, check_resumable, out_dir_lock
from smallfed.flower.checkpoint import load as load_checkpoint
from smallfed.flower.checkpoint import save as save_checkpoint
from smallfed.flower.grids import MeteredGrid, simulated_grid
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    load_record,
    model_config,
    model_to_record,
    record_arrays,
    record_bytes,
)
from smallfed.flower.layers import (
    DeviceClock,
    SecureAggregation,
    build_strategy,
    find,
    restore_stack,
    stack_epsilon,
    stack_privacy,
    stack_state,
    stack_stats,
)
from smallfed.flower.wire import content_objects
from smallfed.models import build_model, model_report
from smallfed.privacy import NEIGHBOURING, check_privacy_config
from smallfed.report.results import RoundRecord, RunRecorder
from smallfed.report.trackers import open_tracker
from smallfed.training import evaluate

RoundHook = Callable[[RoundRecord, int], None]
NodeStates = Callable[[], dict[int, RecordDict]]  # partition id -> the node's Context.state

# How long a round waits for replies: long enough for a slow device, finite so a
# dead one cannot hold the run forever.
ROUND_TIMEOUT_S = 600.0


def default_out_dir(context: Context) -> Path:
    return Path("runs") / f"run-{context.run_id}"


def run_server(  # pylint: disable=too-many-arguments
    grid: Grid,
    context: Context,
    cfg: Config | None = None,
    out_dir: str | Path | None = None,
    on_round: RoundHook | None = None,
    resume: Checkpoint | None = None,
    node_states: NodeStates | None = None,
    inner: Strategy | None = None,
) -> Path:
    """Run the federation to the end and write its results; return the results folder.

    A checkpoint is written after every round (``node_states`` adds the clients' own
    state where the engine can reach it); ``resume`` goes on from one. ``inner`` is the
    strategy the layers wrap (default: the registered ``cfg.strategy``).
    """
    cfg = cfg if cfg is not None else Config.from_mapping(context.run_config)
    out = Path(out_dir or cfg.out_dir or default_out_dir(context))
    data = federated_data(cfg)
    check_privacy_config(cfg, data)  # also when started by `flwr run`, not only the CLI
    with out_dir_lock(out):
        if resume is None and cfg.resume:  # a ServerApp restarted by `flwr run`
            if (out / CHECKPOINT_DIR).is_dir() or (out / f"{CHECKPOINT_DIR}.old").is_dir():
                resume = load_checkpoint(out)
                # The engine's nodes start afresh here: their saved state is not restored.
                check_resumable(cfg, resume, clients_saved=False)
            else:
                log(INFO, "smallfed: resume = true, but %s has no checkpoint; starting afresh",
                    out)
        if resume is None:  # `smallfed simulate --overwrite` has emptied it already
            refuse_finished(out, overwrite=False)
        return _run(grid, cfg, data, out, on_round, resume, node_states, inner)


def refuse_finished(out: Path, overwrite: bool) -> None:
    """ConfigError if ``out`` holds another run's results, unless they may be replaced.

    Checked while the folder's lock is held, so of two runs started into one folder the
    second refuses instead of overwriting the first.
    """
    found = [name for name in ("results.json", CHECKPOINT_DIR) if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}); choose another --out, go on "
            f"with --resume {out}, or replace it with --overwrite")
    for name in ("results.json", "rounds.csv", "clients.csv"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


@dataclass
class RoundStats:
    """What happened to the train replies of a round, summed over the server's layers."""

    sampled: int = 0
    aggregated: int = 0
    failed: int = 0
    rejected: int = 0
    declined: int = 0
    offline: int = 0  # device simulation: sampled but not online
    dropped: int = 0  # device simulation: replies past the round's deadline
    finished: int = 0
    clipped: int = 0  # updates scaled down to the norm bound
    rolled_back: int = 0
    secagg_bytes_up: int = 0  # secure aggregation's own traffic, part of the round's bytes
    secagg_bytes_down: int = 0
    sim_time_s: float | None = None


def round_stats(strategy: Strategy) -> RoundStats:
    counts = stack_stats(strategy)  # a layer of one's own may count more: kept in the log
    known = set(RoundStats.__dataclass_fields__) - {"sim_time_s"}
    stats = RoundStats(**{k: int(v) for k, v in counts.items() if k in known})
    stats.sim_time_s = counts.get("sim_time_s")
    return stats


def _run(  # pylint: disable=too-many-arguments,too-many-locals
    grid: Grid, cfg: Config, data: FederatedData, out: Path, on_round: RoundHook | None,
    resume: Checkpoint | None, node_states: NodeStates | None, inner: Strategy | None,
) -> Path:
    """run_server's work, while it holds ``out``'s lock; ``resume`` is checked already."""
    dataset = data.dataset
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed)
    report = model_report(model)
    dense = record_bytes(model_to_record(model))
    done = resume.round if resume is not None else 0
    if resume is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in resume.global_arrays.items()})
    initial = model_to_record(model)
    strategy = build_strategy(cfg, model, input_shape=dataset.input_shape, inner=inner, done=done,
                              partition_sizes=[len(p) for p in data.partitions])
    clock = find(strategy, DeviceClock)
    secure = find(strategy, SecureAggregation) if cfg.secure_aggregation else None
    reply = RecordDict({ARRAYS_KEY: model_to_record(model), METRICS_KEY: MetricRecord({})})
    metered = MeteredGrid(grid, dense_reply=(dense, 1 + content_objects(reply)))
    recorder = RunRecorder(
        config=cfg.to_dict(), model_params=report.params, model_fp32_bytes=report.fp32_bytes,
        dense_bytes_per_update=dense,
        delta=cfg.dp_delta if cfg.privacy != "none" else None,
        target_accuracy=cfg.target_accuracy, wire_model=metered.wire.block(),
    )
    if resume is not None:
        restore_stack(strategy, resume.server["layers"])
        recorder.restore(resume.server["recorder"], out)
        log(INFO, "smallfed: resuming %s after round %d of %d", out, done, cfg.num_server_rounds)
    tracker = open_tracker(cfg, out)  # closed below, however the run ends

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += done
        load_record(model, arrays)
        loss, accuracy = evaluate(model, dataset.test_x, dataset.test_y)
        if resume is not None and server_round == done:  # recorded before the stop
            metered.take()
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        traffic = metered.take()
        stats = round_stats(strategy) if server_round > 0 else RoundStats()
        spent = stack_epsilon(strategy) or (
            (0.0, 0.0) if cfg.privacy != "none" else (None, None))
        # Every connected node polls for as long as the round takes: its simulated time
        # on devices, its real time on a deployment; a simulation's own time says nothing
        # of a deployment's (and would make its results depend on the machine): none.
        seconds = (stats.sim_time_s or 0.0) if clock is not None else (
            0.0 if simulated_grid(grid) else recorder.since_last())
        poll_down, poll_up = metered.wire.polling(
            seconds * len(list(grid.get_node_ids())) if seconds else 0.0)
        record = recorder.add(
            round=server_round, accuracy=accuracy, loss=loss, bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down, clients=stats.aggregated,
            clients_failed=stats.failed, updates_rejected=stats.rejected,
            clients_declined=stats.declined, epsilon=spent[0], epsilon_mean=spent[1],
            sampled=stats.sampled, sim_time_s=stats.sim_time_s if clock else None,
            clients_finished=stats.finished, clients_dropped=stats.dropped,
            clients_offline=stats.offline, updates_clipped=stats.clipped,
            rolled_back=stats.rolled_back, secagg_bytes_up=stats.secagg_bytes_up,
            secagg_bytes_down=stats.secagg_bytes_down,
            bytes_up_wire_est=round(traffic.wire_up + poll_up),
            dense_bytes_up_wire_est=round(traffic.wire_up_dense + poll_up),
            bytes_down_wire_est=round(traffic.wire_down + poll_down),
            messages_up=traffic.messages_up, messages_down=traffic.messages_down,
            objects_up=traffic.objects_up, objects_down=traffic.objects_down,
        )
        recorder.privacy = privacy_block(cfg, strategy)
        if secure is not None:
            recorder.secure_aggregation = secure.summary_block()
        if clock is not None:
            rows = [asdict(row) for row in clock.take_rows()]
            if cfg.privacy != "user" or cfg.dp_publish_sample:
                recorder.add_clients(out, rows)
        recorder.write(out)  # the finished rounds are on disk if the run is stopped
        save_checkpoint(out, Checkpoint(
            round=server_round, config=cfg.to_dict(), global_arrays=record_arrays(arrays),
            server={"layers": stack_state(strategy), "recorder": recorder.state()},
            clients=node_states() if node_states is not None else {},
        ))
        tracker.log_round(asdict(record))  # after the checkpoint: a resume logs it once
        if on_round is not None:
            on_round(record, cfg.num_server_rounds)
        log(INFO, "smallfed round %d: accuracy %.4f, loss %.4f, %d clients",
            server_round, accuracy, loss, stats.aggregated)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    started = time.perf_counter()
    shape = model_config(dataset.input_shape, dataset.num_classes)
    try:
        strategy.start(
            grid=metered, initial_arrays=initial, num_rounds=cfg.num_server_rounds - done,
            timeout=ROUND_TIMEOUT_S, train_config=ConfigRecord({"lr": cfg.lr, **shape}),
            evaluate_config=ConfigRecord(shape), evaluate_fn=evaluate_fn,
        )
        tracker.log_summary(recorder.write(out)["summary"])
    finally:
        tracker.close()
    log(INFO, "smallfed: results in %s (%.1f s)", out.resolve(), time.perf_counter() - started)
    return out


def privacy_block(cfg: Config, strategy: Strategy) -> dict[str, Any] | None:
    """results.json's ``privacy``: the relation epsilon is for, and what recomputes it."""
    if cfg.privacy == "none":
        return None
    block: dict[str, Any] = {
        "level": cfg.privacy, "neighbouring": NEIGHBOURING[cfg.privacy],
        "accountant": cfg.dp_accountant, "delta": cfg.dp_delta, "secure_rng": cfg.dp_secure_rng}
    return {**block, **(stack_privacy(strategy) or {"clients": {}})}


def build_server_app(
    cfg: Config | None = None, out_dir: str | Path | None = None,
    on_round: RoundHook | None = None, resume: Checkpoint | None = None,
    node_states: NodeStates | None = None, inner: Strategy | None = None,
) -> ServerApp:
    """The ServerApp. With ``cfg`` None it reads the configuration from Flower's run_config;
    ``inner`` replaces the configured strategy under the server's layers."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, cfg, out_dir, on_round, resume, node_states, inner)

    return app
