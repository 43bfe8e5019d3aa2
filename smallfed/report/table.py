"""The table of rounds printed at the end of a run."""

from __future__ import annotations

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
    table = Table(title="smallfed: rounds", show_lines=False)
    private = results["summary"].get("delta") is not None
    names = ["round", "accuracy", "loss", "clients", "bytes up", "bytes down", "time (s)"]
    for name in names + (["epsilon"] if private else []):
        table.add_column(name, justify="right")
    for r in results["rounds"]:
        clients = str(r["clients"])
        notes = [f"{r[key]} {word}" for key, word in (
            ("clients_failed", "failed"), ("updates_rejected", "rejected"),
            ("clients_declined", "declined")) if r[key]]
        if notes:
            clients += f" ({', '.join(notes)})"
        cells = [
            str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", clients,
            human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), f"{r['wall_time_s']:.2f}",
        ]
        table.add_row(*cells, *([f"{r['epsilon']:.3f}"] if private else []))
    s = results["summary"]
    table.caption = (
        f"final accuracy {s['final_accuracy']:.4f} | up {human_bytes(s['total_bytes_up'])}, "
        f"{_ratio(s['compression_ratio_up'])} fewer than dense fp32 | down "
        f"{human_bytes(s['total_bytes_down'])}, {_ratio(s['compression_ratio_down'])} fewer | "
        f"{s['model_params']:,} parameters | {s['wall_time_s']:.1f} s"
    )
    if private:
        table.caption += f" | epsilon {s['epsilon']:.3f} at delta {s['delta']:g}"
    return table


def print_rounds(results: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(rounds_table(results))
