"""``smallfed report DIR``: the trade-off plots of a sweep, Pareto fronts marked, and a
short Markdown report that embeds them.

Each plot puts held-out accuracy against one cost: upload bytes, epsilon (private
points only) and simulated time to the target accuracy (device sweeps only). A point
is on the Pareto front when no other point is at least as accurate for less cost.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from smallfed.config import ConfigError  # noqa: E402

COSTS = (  # (column, axis label, file, log scale)
    ("total_bytes_up", "upload bytes (total)", "accuracy_vs_bytes.png", True),
    ("epsilon", "epsilon (delta as configured)", "accuracy_vs_epsilon.png", False),
    ("sim_time_to_target_s", "simulated time to target accuracy (s)",
     "accuracy_vs_time.png", True),
)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, accuracy) points no other point beats: cheaper and as accurate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def read_table(sweep_dir: str | Path) -> list[dict[str, str]]:
    table = Path(sweep_dir) / "sweep.csv"
    if not table.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep.csv; run `smallfed sweep` first")
    with open(table, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_cost(rows: list[dict[str, str]], column: str, label: str, path: Path,
              log: bool) -> list[dict[str, str]] | None:
    """One accuracy-against-cost plot with its front; None when no row has the cost."""
    usable = [r for r in rows if r.get(column) not in (None, "", "None")]
    if not usable:
        return None
    points = [(float(r[column]), float(r["final_accuracy"])) for r in usable]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter(*zip(*points), color="tab:gray", s=22, label="points")
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "o-",
            color="tab:red", label="Pareto front")
    for i in ordered:
        ax.annotate(usable[i]["point"].rsplit(",seed=", 1)[0], points[i], fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    if log:  # symlog where a cost is 0 (a target reached at round 0)
        ax.set_xscale("log" if min(c for c, _ in points) > 0 else "symlog")
    ax.set(xlabel=label, ylabel="final held-out accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [usable[i] for i in ordered]


def write_report(sweep_dir: str | Path) -> Path:
    """The plots and report.md in ``sweep_dir``; return the report's path."""
    sweep_dir = Path(sweep_dir)
    rows = read_table(sweep_dir)
    lines = [f"# Trade-offs: {sweep_dir.name}", "", f"{len(rows)} points "
             "(`sweep.csv` has them all). On each plot, the red line is the Pareto front.", ""]
    for column, label, name, log in COSTS:
        front = plot_cost(rows, column, label, sweep_dir / name, log)
        if front is None:
            continue
        lines += [f"## Accuracy against {label}", "", f"![{label}]({name})", "",
                  "| point | accuracy | " + column + " |", "|---|---:|---:|"]
        lines += [f"| {r['point']} | {float(r['final_accuracy']):.4f} | {r[column]} |"
                  for r in front]
        lines.append("")
    report = sweep_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
