"""The table of rounds printed at the end of a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def rounds_table(results: dict[str, Any]) -> Table:
    """The rounds, with the columns this run has: the wire estimate where recorded,
    the simulated devices' time, offline and dropped clients, and epsilon under DP."""
    table = Table(title="smallfed: rounds", show_lines=False)
    rounds, s = results["rounds"], results["summary"]
    private = s.get("delta") is not None
    devices = any(r.get("sim_time_s") is not None for r in rounds)
    wire = s.get("total_bytes_up_wire_est") is not None
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("round", lambda r: str(r["round"])),
        ("accuracy", lambda r: f"{r['accuracy']:.4f}"),
        ("loss", lambda r: f"{r['loss']:.4f}"),
        ("clients", _clients),
        ("bytes up", lambda r: human_bytes(r["bytes_up"])),
        *([("wire up (est.)", lambda r: human_bytes(r["bytes_up_wire_est"]))] if wire else []),
        ("bytes down", lambda r: human_bytes(r["bytes_down"])),
        *([("wire down (est.)", lambda r: human_bytes(r["bytes_down_wire_est"]))]
          if wire else []),
        ("time (s)", lambda r: f"{r['wall_time_s']:.2f}"),
        *([("simulated (s)", lambda r: _seconds(r["sim_time_s"])),
           ("offline", lambda r: str(r["clients_offline"])),
           ("dropped", lambda r: str(r["clients_dropped"]))] if devices else []),
        *([("epsilon", lambda r: f"{r['epsilon']:.3f}")] if private else []),
    ]
    for name, _ in columns:
        table.add_column(name, justify="right")
    for r in rounds:
        table.add_row(*(cell(r) for _, cell in columns))
    table.caption = (
        f"final accuracy {s['final_accuracy']:.4f} | up {human_bytes(s['total_bytes_up'])}, "
        f"{_ratio(s['compression_ratio_up'])} fewer than dense fp32"
        + (f" (on the wire, est.: {human_bytes(s['total_bytes_up_wire_est'])}, "
           f"{_ratio(s['compression_ratio_up_wire_est'])})" if wire else "")
        + f" | down {human_bytes(s['total_bytes_down'])}, "
        f"{_ratio(s['compression_ratio_down'])} fewer | "
        f"{s['model_params']:,} parameters | {s['wall_time_s']:.1f} s"
    )
    if devices:
        table.caption += f" | simulated {s['sim_time_s']:.1f} s"
    if private:
        table.caption += f" | epsilon {s['epsilon']:.3f} at delta {s['delta']:g}"
    return table


def _clients(r: dict[str, Any]) -> str:
    notes = [f"{r[key]} {word}" for key, word in (
        ("clients_failed", "failed"), ("updates_rejected", "rejected"),
        ("clients_declined", "declined")) if r[key]]
    return str(r["clients"]) + (f" ({', '.join(notes)})" if notes else "")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_rounds(results: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(rounds_table(results))
