"""``smallfed report DIR``: a sweep's trade-offs as figures for a paper, and a report.md
that tabulates them and says what each leaves out and why.

Seeds are pooled per configuration (see aggregate.py): each marker is a mean, with its
95% interval as error bars in both axes, and the Pareto front runs through the means.
Final accuracy is plotted against upload bytes (beside the wire estimate where
sweep.csv has it), against epsilon (non-private configurations as reference lines) and
against simulated time to the target accuracy (device sweeps).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallfed.config import ConfigError
from smallfed.report.aggregate import (LEVEL, Configuration, Row, Stat, configurations,
                                       pareto_front, stat, value)
from smallfed.report.style import drop, figure, legend_below, paper, save

ACCURACY = "final_accuracy"
WIRE = "total_bytes_up_wire_est"  # estimated bytes on the wire (newer sweep.csv files)
RATIO = "compression_ratio_up"  # 1: the dense baseline, the update as it is
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
          "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclass(frozen=True)
class Cost:
    column: str
    name: str  # in titles and report.md
    file: str  # the PNG; the PDF is beside it
    log: bool
    spec: str  # how report.md writes its values


BYTES = Cost("total_bytes_up", "upload bytes", "accuracy_vs_bytes.png", True, ",.0f")
EPSILON = Cost("epsilon", "epsilon", "accuracy_vs_epsilon.png", False, ".3g")
TIME = Cost("sim_time_to_target_s", "simulated time to target", "accuracy_vs_time.png",
            False, ",.1f")
COSTS = (BYTES, EPSILON, TIME)


@dataclass
class Entry:
    """A configuration drawn as a point: its accuracy and cost (and wire estimate)."""

    config: Configuration
    accuracy: Stat
    cost: Stat
    wire: Stat | None = None


@dataclass
class Panel:
    """One plot, and what report.md says about it."""

    cost: Cost
    xlabel: str
    points: list[Entry] = field(default_factory=list)
    references: list[tuple[Configuration, Stat]] = field(default_factory=list)  # accuracy lines
    left_out: list[tuple[Configuration, str, str]] = field(default_factory=list)  # why: short, long
    front: set[str] = field(default_factory=set)  # configuration names
    baseline: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # omissions of a whole column
    not_drawn: str | None = None
    legend: list[str] = field(default_factory=list)  # the labels as drawn


@dataclass
class SweepReport:
    path: Path
    configurations: list[Configuration]
    panels: list[Panel]


def read_table(sweep_dir: str | Path) -> tuple[list[str], list[Row]]:
    """sweep.csv's header and rows."""
    table = Path(sweep_dir) / "sweep.csv"
    if not table.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep.csv; run `smallfed sweep` first")
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if not {"point", ACCURACY} <= set(header):
        raise ConfigError(f"{table}: no point and final_accuracy columns; pass the out "
                          "folder of a `smallfed sweep`, whose sweep.csv has them")
    if not rows:
        raise ConfigError(f"{table} has no rows: no point has finished yet; run `smallfed "
                          "sweep` until some have")
    return header, rows


def point_configs(sweep_dir: Path) -> list[dict[str, Any]]:
    """The configurations in the points' results.json: sweep.csv has neither delta nor
    the target accuracy. Empty where the points' folders are not there."""
    configs = []
    for path in (sweep_dir / "points").glob("*/results.json"):
        try:
            configs.append(json.loads(path.read_text())["config"])
        except (OSError, ValueError, LookupError, TypeError):
            continue  # unreadable: the axis labels say less, nothing worse
    return configs


def setting(configs: list[dict[str, Any]], key: str, applies: str) -> str:
    """The values of ``key`` in the configurations where key ``applies`` is set, as
    "1e-05" or "1e-05 or 1e-06"; "" if none."""
    found = {float(c[key]) for c in configs
             if c.get(applies) not in (None, "", "none") and c.get(key) is not None}
    return " or ".join(f"{v:g}" for v in sorted(found))


def xlabels(delta: str, target: str) -> dict[str, str]:
    """Each cost's axis label, with its unit."""
    return {
        BYTES.column: "upload bytes, all clients and rounds (bytes)",
        EPSILON.column: f"epsilon at delta={delta}" if delta else
        "epsilon (at each point's dp-delta)",
        TIME.column: f"simulated time to accuracy {target or 'target-accuracy'} (seconds)",
    }


def why_missing(cost: Cost, config: Configuration, missing: list[Row], target: str
                ) -> tuple[str, str]:
    """Why a configuration lacks the cost in some seeds: a short phrase for the plot's
    note, and the reason for report.md."""
    n = len(config.rows)
    if cost is not TIME:
        return (f"without {cost.column} in some seed",
                f"empty {cost.column} in {len(missing)} of {n} seeds")
    no_devices = sum(value(r, "sim_time_s") is None for r in missing)
    never = len(missing) - no_devices
    reached = f"never reached target-accuracy{' ' + target if target else ''}"
    if no_devices:
        return ("without simulated devices",
                f"no simulated devices (empty sim_time_s) in {no_devices} of {n} seeds"
                + (f"; {reached} in {never}" if never else ""))
    return ("that never reached the target in some seed", f"{reached} in {never} of {n} seeds")


def not_drawn(cost: Cost, header: list[str], configs: list[Configuration]) -> str | None:
    """Why the plot cannot be drawn whatever its configurations, if so."""
    if cost.column not in header:
        return (f"sweep.csv has no {cost.column} column (an older smallfed wrote it); run "
                "the sweep again to add it")
    rows = [r for c in configs for r in c.rows]
    if cost is EPSILON and all(value(r, EPSILON.column) is None for r in rows):
        return "no configuration is private (epsilon is empty in every seed)"
    if cost is TIME and all(value(r, "sim_time_s") is None for r in rows):
        return ("no configuration simulates devices (sim_time_s is empty in every seed); "
                "time to target is measured in device sweeps only")
    return None


def build_panel(cost: Cost, header: list[str], configs: list[Configuration], xlabel: str,
                target: str) -> Panel:
    """Sort the configurations into points, reference lines and the left out."""
    panel = Panel(cost, xlabel, not_drawn=not_drawn(cost, header, configs))
    if panel.not_drawn:
        return panel
    for config in configs:
        if not config.rows:
            panel.left_out.append((config, "with every seed failed", "every seed failed"))
            continue
        missing = [r for r in config.rows if value(r, cost.column) is None]
        accuracy = stat(config.rows, ACCURACY)
        if not missing:
            panel.points.append(Entry(config, accuracy, stat(config.rows, cost.column)))
        elif cost is EPSILON and len(missing) == len(config.rows):
            panel.references.append((config, accuracy))
        else:
            panel.left_out.append((config, *why_missing(cost, config, missing, target)))
    if cost is BYTES:
        add_wire_and_baseline(panel, header)
    means = [(e.cost.mean, e.accuracy.mean) for e in panel.points]
    panel.front = {panel.points[i].config.name for i in pareto_front(means)}
    if not panel.points:
        panel.not_drawn = (f"no configuration has {cost.column} in all its finished seeds "
                           "(Left out has each configuration's reason)")
    return panel


def add_wire_and_baseline(panel: Panel, header: list[str]) -> None:
    """The wire estimate beside the payload, and the dense configurations marked."""
    if WIRE in header:
        for entry in panel.points:
            missing = sum(value(r, WIRE) is None for r in entry.config.rows)
            if not missing:
                entry.wire = stat(entry.config.rows, WIRE)
                continue
            panel.notes.append(
                f"{entry.config.name}: no wire estimate in {missing} of "
                f"{len(entry.config.rows)} seeds (results from before it): payload only")
    else:
        panel.notes.append(f"missing column {WIRE}: the bytes plot shows the payload only, "
                           "no wire estimate")
    if RATIO in header:
        panel.baseline = {e.config.name for e in panel.points
                          if all(value(r, RATIO) == 1.0 for r in e.config.rows)}
    else:
        panel.notes.append(f"missing column {RATIO}: no dense baseline marked")


def looks(configs: list[Configuration]) -> dict[str, tuple[str, str]]:
    """A colour and marker per configuration, the same in every plot of the sweep."""
    return {c.name: (COLORS[i % len(COLORS)], MARKERS[i // len(COLORS) % len(MARKERS)])
            for i, c in enumerate(configs)}


def subtitle(panel: Panel) -> str:
    """What a marker is, and what the plot leaves out (report.md has the details)."""
    seeds = sorted({e.accuracy.n for e in panel.points})
    if seeds[-1] == 1:
        marker = "one seed per configuration, so no interval"
    else:
        n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        marker = (f"mean ± {LEVEL:.0%} CI over {n} seeds"
                  + (" (none with 1 seed)" if seeds[0] == 1 else " per configuration"))
    lines = [f"{marker}; line: Pareto front of the means"]
    counts = Counter(short for _, short, _ in panel.left_out)
    if counts:
        lines.append("not shown: " + "; ".join(
            f"{k} configuration{'s' if k > 1 else ''} {short}" for short, k in counts.items())
            + " (see report.md)")
    return "\n".join(lines)


def draw(panel: Panel, title: str, path: Path, look: dict[str, tuple[str, str]]) -> None:
    """The panel's figure as PNG and PDF; its legend labels go into ``panel.legend``."""
    with paper():
        fig = figure()
        ax = fig.add_subplot()
        lows = []  # the costs drawn: a log axis needs them positive
        for e in panel.points:
            color, marker = look[e.config.name]
            for cost, filled in ((e.cost, True), (e.wire, False)):
                if cost is None:
                    continue
                # A cost is never negative: its interval is cut at 0 (report.md has it whole).
                xerr = None if cost.half is None else [[min(cost.half, cost.mean)], [cost.half]]
                ax.errorbar(cost.mean, e.accuracy.mean, xerr=xerr,
                            yerr=e.accuracy.half if filled else None,  # once is enough
                            fmt=marker, color=color, ms=5, capsize=2, elinewidth=0.8,
                            mfc=color if filled else "white",
                            label=e.config.label if filled else None)
                lows.append(cost.mean)
            if e.wire is not None:  # payload and wire estimate of one configuration
                ax.plot([e.cost.mean, e.wire.mean], [e.accuracy.mean] * 2, color=color,
                        lw=0.6, ls=":")
        front = sorted((e.cost.mean, e.accuracy.mean) for e in panel.points
                       if e.config.name in panel.front)
        ax.plot(*zip(*front), color="black", lw=1, zorder=1, label="Pareto front (means)")
        base = [(e.cost.mean, e.accuracy.mean) for e in panel.points
                if e.config.name in panel.baseline]
        if base:
            ax.scatter(*zip(*base), s=150, facecolors="none", edgecolors="black", lw=0.8,
                       label="dense baseline (compression ratio 1)")
        if any(e.wire for e in panel.points):
            for text, face in (("filled: payload", "0.4"), ("hollow: wire estimate", "white")):
                ax.plot([], [], "o", color="0.4", mfc=face, label=text)
        for config, accuracy in panel.references:
            color, _ = look[config.name]
            ax.axhline(accuracy.mean, color=color, ls="--", lw=1,
                       label=f"no DP (reference): {config.label}")
            if accuracy.half is not None:
                ax.axhspan(accuracy.mean - accuracy.half, accuracy.mean + accuracy.half,
                           color=color, alpha=0.12, lw=0)
        if panel.cost.log:  # symlog where a cost is 0 (a target met at round 0)
            ax.set_xscale("log" if min(lows) > 0 else "symlog")
        bottom, top = ax.get_ylim()  # an interval past [0, 1] is cut at the axis
        ax.set(xlabel=panel.xlabel, ylabel="final held-out accuracy",
               ylim=(max(bottom, -0.02), min(top, 1.02)))
        ax.set_title(subtitle(panel), loc="left", fontsize=8)
        fig.suptitle(title)
        panel.legend = legend_below(fig, ax)
        save(fig, path)


def table(panel: Panel, configs: list[Configuration]) -> list[str]:
    """Every configuration of the sweep, as this plot shows it or why it does not."""
    spec = panel.cost.spec
    wire = any(e.wire for e in panel.points)
    head = ["configuration", "label", "seeds", "final accuracy", f"{panel.cost.name}",
            *(["wire estimate"] if wire else []), "on front", "shown as"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|---|---:|---:|---:|" + ("---:|" if wire else "") + "---|---|"]
    points = {e.config.name: e for e in panel.points}
    references = dict((c.name, a) for c, a in panel.references)
    left = {c.name: why for c, _, why in panel.left_out}
    for config in configs:
        if config.name in points:
            e = points[config.name]
            cells = [str(e.accuracy.n), e.accuracy.text(".4f"), e.cost.text(spec),
                     *([e.wire.text(spec) if e.wire else "—"] if wire else []),
                     "yes" if config.name in panel.front else "no",
                     "point, dense baseline" if config.name in panel.baseline else "point"]
        else:
            accuracy = references.get(config.name) or (
                stat(config.rows, ACCURACY) if config.rows else None)
            shown = ("reference line (not private)" if config.name in references
                     else f"left out: {left[config.name]}")
            cells = [str(len(config.rows)), accuracy.text(".4f") if accuracy else "—", "—",
                     *(["—"] if wire else []), "no", shown]
        lines.append(f"| {config.name} | {config.label} | " + " | ".join(cells) + " |")
    return lines


def left_out(panels: list[Panel], configs: list[Configuration]) -> list[str]:
    """Every omission of the report, each with its reason."""
    lines = [f"- failed seed `{r['point']}` (empty final_accuracy): excluded from every mean"
             for c in configs for r in c.failed]
    lines += [f"- `{c.label}` ({c.name}): one seed, so no confidence interval"
              for c in configs if len(c.rows) == 1]
    for panel in panels:
        plot = f"accuracy against {panel.cost.name}"
        if panel.not_drawn:
            lines.append(f"- {plot}: not drawn: {panel.not_drawn}")
        else:
            lines += [f"- {plot}: `{c.label}` ({c.name}) is not private: drawn as a "
                      "reference line (mean, interval shaded), not a point"
                      for c, _ in panel.references]
        lines += [f"- {plot}: `{c.label}` ({c.name}) left out: {why}"
                  for c, _, why in panel.left_out]
        lines += [f"- {plot}: {note}" for note in panel.notes]
    return lines or ["Nothing: every configuration is in every plot, with all its seeds."]


def markdown(sweep_dir: Path, rows: list[Row], configs: list[Configuration],
             panels: list[Panel]) -> str:
    seeds = sorted({len(c.rows) for c in configs})
    lines = [
        f"# Trade-offs: {sweep_dir.name}", "",
        f"{len(rows)} rows of `sweep.csv`, {len(configs)} configurations with "
        f"{' to '.join(map(str, (seeds[0], seeds[-1]) if len(seeds) > 1 else seeds))} "
        "finished seeds each. A marker is a configuration's mean over its finished seeds; "
        f"its error bars, in both axes, are the {LEVEL:.0%} Student-t confidence interval of "
        "the mean (t(0.975, n-1) * s / sqrt(n)), drawn cut at 0 on a cost axis, and a "
        "configuration with one seed has none. Tables give mean ± half-width, uncut. The Pareto front (black line) runs through "
        "the means: a configuration is on it when no other is at least as accurate for no "
        "more mean cost. Each figure is a PNG (200 dpi) with a vector PDF beside it.", ""]
    for panel in panels:
        title = f"Final accuracy against {panel.cost.name}"
        lines += [f"## {title}", ""]
        if panel.not_drawn:
            lines += [f"Not drawn: {panel.not_drawn}.", ""]
            continue
        pdf = Path(panel.cost.file).with_suffix(".pdf")
        lines += [f"![{title}]({panel.cost.file})", "", f"Vector version: [{pdf}]({pdf}). "
                  f"x axis: {panel.xlabel}.", "", *table(panel, configs), ""]
    return "\n".join([*lines, "## Left out", "", *left_out(panels, configs), ""])


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> SweepReport:
    """The figures and report.md of the sweep in ``sweep_dir``, written into ``out``
    (default: the sweep's folder). A plot with nothing to draw has its old files
    removed, so that none outlives the data it showed."""
    sweep_dir = Path(sweep_dir)
    header, rows = read_table(sweep_dir)
    folder = Path(out) if out is not None else sweep_dir
    folder.mkdir(parents=True, exist_ok=True)
    axes = header[:header.index("point")]  # sweep.csv's first columns: the axes' options
    configs = configurations(rows, axes)
    look = looks(configs)
    ran = point_configs(sweep_dir)
    target = setting(ran, "target-accuracy", "devices")
    axis = xlabels(setting(ran, "dp-delta", "privacy"), target)
    panels = [build_panel(cost, header, configs, axis[cost.column], target) for cost in COSTS]
    for panel in panels:
        if panel.not_drawn:
            drop(folder / panel.cost.file)
        else:
            draw(panel, f"{sweep_dir.name}: final accuracy against {panel.cost.name}",
                 folder / panel.cost.file, look)
    report = folder / "report.md"
    report.write_text(markdown(sweep_dir, rows, configs, panels), encoding="utf-8")
    return SweepReport(report, configs, panels)
