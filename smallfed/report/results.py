"""results.json and rounds.csv: the record of a run, in a documented, versioned schema.

Schema version 1 (README "Results"):

* ``schema_version``: 1
* ``config``: every configuration key and its value
* ``rounds``: one entry per round, round 0 being the initial model, each with
  ``round``, ``accuracy``, ``loss`` (centralized, on the held-out test set),
  ``bytes_up``, ``bytes_down`` (serialized array bytes of the messages sent that
  round), ``clients`` (train replies aggregated), ``clients_failed``,
  ``updates_rejected``, ``clients_declined`` (clients whose privacy budget was spent),
  ``epsilon`` and ``epsilon_mean`` (the largest and mean epsilon, at the run's delta,
  over every client that has trained so far; null without DP), ``wall_time_s``
  (seconds the round took) and, with device simulation (``devices``), ``sim_time_s``
  (the round's simulated duration), ``clients_finished``, ``clients_dropped`` (past
  the deadline) and ``clients_offline`` (null and 0 without it); ``bytes_up_wire_est``
  and ``bytes_down_wire_est``, what the round's messages would cost a deployment on
  the wire (payload, Flower's requests and framing, the nodes' polling for the round's
  duration and each node's one-off join; :mod:`smallfed.flower.wire`),
  ``dense_bytes_up_wire_est`` (the same with every update dense fp32), and the
  ``messages_up``/``messages_down`` and ``objects_up``/``objects_down`` (Flower objects,
  one request each) that estimate is made from.
* ``summary``: ``final_accuracy``, ``best_accuracy``, ``total_bytes_up``,
  ``total_bytes_down``, ``dense_bytes_up`` (what the aggregated updates, and the
  stragglers' dropped ones, would have cost as dense fp32 arrays), ``dense_bytes_down`` (the same for the models sent to
  the sampled clients), ``compression_ratio_up`` (dense_bytes_up / total_bytes_up),
  ``compression_ratio_down``, ``total_bytes_up_wire_est``, ``total_bytes_down_wire_est``,
  ``dense_bytes_up_wire_est`` (the same run with dense fp32 updates, on the wire),
  ``compression_ratio_up_wire_est`` (dense_bytes_up_wire_est / total_bytes_up_wire_est),
  ``wire_model`` (the estimate's constants and the Flower version they were measured
  with; the four wire fields null for a run resumed from rounds recorded without
  them), ``epsilon`` and ``delta`` (the run's privacy guarantee;
  null without DP), ``model_params``, ``model_fp32_bytes``, ``wall_time_s``,
  ``sim_time_s`` (total simulated time) and ``sim_time_to_target_s`` (simulated time
  until ``target-accuracy`` was first reached; null if never, or without devices), and
  ``privacy`` (null without DP): ``level``, ``neighbouring`` (the relation epsilon is
  for), ``accountant``, ``delta``, ``secure_rng`` and what recomputes epsilon: at user
  level ``noise_multiplier``, ``sample_rate``, ``rounds_accounted`` and ``epsilon``; at
  sample level ``clients``, per partition id the mechanism it reported
  (``noise_multiplier``, ``sample_rate``, ``steps_per_round``, ``rounds_trained``) and
  the largest ``epsilon`` it reported.

With device simulation ``clients.csv`` has a row per sampled client and round: its
device, status, bytes each way and simulated compute, transfer and total seconds.
Under ``privacy = "user"`` it is not written unless ``dp-publish-sample``: it would
publish the secret Poisson sample the accountant's amplification relies on. It
grows as the run goes (rows appended each round); a checkpoint keeps only its row
count, so checkpoints do not grow with the run.

Later features add fields; they never change the meaning of one.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


SCHEMA_VERSION = 1
ROUND_FIELDS = (
    "round", "accuracy", "loss", "bytes_up", "bytes_down", "clients", "clients_failed",
    "updates_rejected", "clients_declined", "epsilon", "epsilon_mean", "wall_time_s",
    "sim_time_s", "clients_finished", "clients_dropped", "clients_offline", "updates_clipped",
    "rolled_back", "secagg_bytes_up", "secagg_bytes_down", "bytes_up_wire_est",
    "bytes_down_wire_est", "dense_bytes_up_wire_est", "messages_up", "messages_down", "objects_up", "objects_down",
)


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    clients: int
    clients_failed: int
    updates_rejected: int
    clients_declined: int
    epsilon: float | None
    epsilon_mean: float | None
    wall_time_s: float
    sim_time_s: float | None = None
    clients_finished: int = 0
    clients_dropped: int = 0
    clients_offline: int = 0
    updates_clipped: int = 0  # updates scaled down to the server's norm bound
    rolled_back: int = 0  # 1: the aggregate was non-finite and the round was undone
    # Secure aggregation's own traffic (keys, shares, unmasking), included in bytes_up/down.
    secagg_bytes_up: int = 0
    secagg_bytes_down: int = 0
    # The transport's estimated bytes (smallfed.flower.wire): payload, requests, polling.
    bytes_up_wire_est: int = 0
    bytes_down_wire_est: int = 0
    dense_bytes_up_wire_est: int = 0  # bytes_up_wire_est had the updates been dense fp32
    messages_up: int = 0
    messages_down: int = 0
    objects_up: int = 0  # Flower objects the messages travelled as: one request each
    objects_down: int = 0


@dataclass
class RunRecorder:
    """Collects the rounds of a run and writes them out."""

    config: dict[str, Any]
    model_params: int
    model_fp32_bytes: int
    dense_bytes_per_update: int
    delta: float | None = None
    target_accuracy: float = 1.0
    wire_model: dict[str, Any] | None = None  # the constants of the wire estimate
    rounds: list[RoundRecord] = field(default_factory=list)
    privacy: dict[str, Any] | None = None  # summary's privacy block, refreshed each round
    secure_aggregation: dict[str, Any] | None = None  # summary's block: bits, coordinates, ...
    clients_rows: int = 0  # rows in clients.csv
    models_sent: int = 0
    elapsed_before: float = 0.0  # seconds spent before a resume
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)

    def add(self, sampled: int = 0, **values: Any) -> RoundRecord:
        """Record a round; ``sampled`` clients were each sent the global model."""
        self.models_sent += sampled
        now = time.perf_counter()
        record = RoundRecord(wall_time_s=round(now - self._last, 4), **values)
        self._last = now
        self.rounds.append(record)
        return record

    def since_last(self) -> float:
        """Seconds since the last round was recorded (or the recorder was made)."""
        return time.perf_counter() - self._last

    def add_clients(self, out_dir: str | Path, rows: list[dict[str, Any]]) -> None:
        """Append a round's rows to ``out_dir/clients.csv`` (a new file for the first)."""
        if not rows:
            return
        path = Path(out_dir) / "clients.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Appending, the file's own header decides the columns: a run resumed from an
        # older version's checkpoint leaves out what its header lacks, aligned.
        header = list(rows[0])
        if self.clients_rows and path.is_file():
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), header)
        with open(path, "a" if self.clients_rows else "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            if not self.clients_rows:
                writer.writeheader()
            writer.writerows(rows)
        self.clients_rows += len(rows)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the recorder (JSON)."""
        return {"rounds": [asdict(r) for r in self.rounds], "models_sent": self.models_sent,
                "elapsed_s": self.elapsed(), "clients_rows": self.clients_rows}

    def restore(self, state: dict[str, Any], out_dir: str | Path) -> None:
        """Go on from a checkpoint of a run that writes to ``out_dir``: rows of clients.csv
        past the checkpoint's count (a round it did not finish) are dropped."""
        self.rounds = [RoundRecord(**row) for row in state["rounds"]]
        if any("bytes_up_wire_est" not in row for row in state["rounds"]):
            self.wire_model = None  # rounds from before the estimate: no total to claim
        self.models_sent = int(state["models_sent"])
        self.elapsed_before = float(state["elapsed_s"])
        path = Path(out_dir) / "clients.csv"
        if "clients" in state:  # older checkpoints held the rows themselves
            self.clients_rows = 0
            self.add_clients(out_dir, list(state["clients"]))
            return
        self.clients_rows = int(state.get("clients_rows", 0))
        if not self.clients_rows:
            return
        # Bytes, not text: csv writes \r\n line ends, which text mode would rewrite.
        lines = path.read_bytes().splitlines(keepends=True) if path.is_file() else []
        if len(lines) < 1 + self.clients_rows:
            warnings.warn(f"{path} has {max(len(lines) - 1, 0)} rows, the checkpoint counts "
                          f"{self.clients_rows}: it was changed or removed; it starts again "
                          "with the resumed rounds", stacklevel=2)
            self.clients_rows = 0
            return
        path.write_bytes(b"".join(lines[:1 + self.clients_rows]))

    def results(self) -> dict[str, Any]:
        final = self.rounds[-1] if self.rounds else None
        updates = sum(r.clients + r.clients_dropped for r in self.rounds)  # all that uploaded
        up = sum(r.bytes_up for r in self.rounds)
        down = sum(r.bytes_down for r in self.rounds)
        dense_up = updates * self.dense_bytes_per_update
        dense_down = self.models_sent * self.dense_bytes_per_update
        wire_up = sum(r.bytes_up_wire_est for r in self.rounds)
        dense_wire_up = sum(r.dense_bytes_up_wire_est for r in self.rounds)
        wire = self.wire_model is not None  # None: resumed from rounds recorded without it
        summary = {
            "final_accuracy": final.accuracy if final else None,
            "best_accuracy": max((r.accuracy for r in self.rounds), default=None),
            "total_bytes_up": up,
            "total_bytes_down": down,
            "dense_bytes_up": dense_up,
            "dense_bytes_down": dense_down,
            "compression_ratio_up": round(dense_up / up, 3) if up else None,
            "compression_ratio_down": round(dense_down / down, 3) if down else None,
            "total_bytes_up_wire_est": wire_up if wire else None,
            "total_bytes_down_wire_est": (sum(r.bytes_down_wire_est for r in self.rounds)
                                          if wire else None),
            "dense_bytes_up_wire_est": dense_wire_up if wire else None,
            "compression_ratio_up_wire_est": (round(dense_wire_up / wire_up, 3)
                                              if wire and wire_up else None),
            "wire_model": self.wire_model,
            "epsilon": final.epsilon if final else None,
            "delta": self.delta,
            "privacy": self.privacy,
            "secure_aggregation": self.secure_aggregation and {
                **self.secure_aggregation,
                "total_bytes_up": sum(r.secagg_bytes_up for r in self.rounds),
                "total_bytes_down": sum(r.secagg_bytes_down for r in self.rounds)},
            "model_params": self.model_params,
            "model_fp32_bytes": self.model_fp32_bytes,
            "wall_time_s": round(self.elapsed(), 3),
            **self.simulated_time(),
        }
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "rounds": [asdict(r) for r in self.rounds],
            "summary": summary,
        }

    def simulated_time(self) -> dict[str, float | None]:
        """Total simulated time, and when target-accuracy was first reached (devices only)."""
        if not any(r.sim_time_s is not None for r in self.rounds):
            return {"sim_time_s": None, "sim_time_to_target_s": None}
        elapsed, to_target = 0.0, None
        for r in self.rounds:
            elapsed += r.sim_time_s or 0.0
            if to_target is None and r.accuracy >= self.target_accuracy:
                to_target = round(elapsed, 3)
        return {"sim_time_s": round(elapsed, 3), "sim_time_to_target_s": to_target}

    def write(self, out_dir: str | Path) -> dict[str, Any]:
        """Write results.json and rounds.csv into ``out_dir`` (clients.csv is there
        already); return the results."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = self.results()
        partial = out / "results.json.tmp"  # then renamed: never a half-written results.json
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(out / "results.json")
        with open(out / "rounds.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=ROUND_FIELDS)
            writer.writeheader()
            writer.writerows(results["rounds"])
        return results
