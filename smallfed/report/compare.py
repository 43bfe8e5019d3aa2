"""``smallfed report RUN [RUN ...]``: the accuracy-per-round curves of several runs in one
figure, each named by the configuration keys in which the runs differ, and compare.md
with a table of them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from smallfed.config import RUNNING_KEYS, Config, ConfigError
from smallfed.report.style import figure, legend_below, paper, save

WHAT = ("pass one sweep's out folder (it has sweep.csv), or one or more run folders (each "
        "has results.json, as `smallfed simulate --out DIR` writes it)")
SHARED = ("model", "dataset", "num-clients", "strategy", "codec", "privacy")  # in the title
STYLES = ("-", "--", ":", "-.")
# Not Config.from_mapping: that validates, which imports torch and Flower (seconds).
DEFAULTS = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]  # every key, a missing one as its default
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass(frozen=True)
class Comparison:
    path: Path  # compare.md
    keys: list[str]  # the keys the runs differ in
    labels: list[str]  # the figure's legend, one per run


def sweep_folder(paths: Sequence[str | Path]) -> Path | None:
    """The sweep folder when ``paths`` is one alone; None when all are run folders.
    Anything else is a ConfigError that says what to pass, before a file is written."""
    sweeps = [Path(p) for p in paths if (Path(p) / "sweep.csv").is_file()]
    runs = [Path(p) for p in paths if (Path(p) / "results.json").is_file()]
    for path in map(Path, paths):
        if path not in sweeps and path not in runs:
            raise ConfigError(f"{path}: neither a sweep folder nor a run folder; {WHAT}")
    if sweeps and runs:
        raise ConfigError(f"{sweeps[0]} is a sweep folder and {runs[0]} a run folder: report "
                          "on one sweep alone, or on run folders only")
    if len(sweeps) > 1:
        raise ConfigError(f"{len(sweeps)} sweep folders ({', '.join(map(str, sweeps))}): "
                          "`smallfed report` takes one sweep at a time")
    return sweeps[0] if sweeps else None


def load_run(path: Path) -> Run:
    file = path / "results.json"
    try:
        results = json.loads(file.read_text())
        config, rounds, summary = results["config"], results["rounds"], results["summary"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{file}: not a results.json of smallfed ({err}); {WHAT}") from err
    # A key added to smallfed since the run counts as its default, not as a difference.
    return Run(path, {**DEFAULTS, **config}, rounds, summary)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The keys whose values are not the same in all runs, in config order; keys of
    where and how a run ran (RUNNING_KEYS) change no result and are ignored."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    return [k for k in keys if k not in RUNNING_KEYS
            and len({json.dumps(run.config.get(k)) for run in runs}) > 1]


def shown(value: Any) -> str:
    """A config value as written in a legend or table: an empty one visibly so."""
    return '""' if value == "" else str(value)


def label(run: Run, keys: list[str]) -> str:
    return ", ".join(f"{k}={shown(run.config.get(k))}" for k in keys) if keys else str(run.path)


def cell(value: Any, spec: str) -> str:
    return "—" if value is None else f"{value:{spec}}"


def markdown(runs: list[Run], keys: list[str], shared: str) -> str:
    lines = ["# Runs compared", "",
             f"{len(runs)} runs; they differ in: {', '.join(keys) or 'nothing'} (keys of "
             f"where a run ran are ignored: {', '.join(sorted(RUNNING_KEYS))}). Shared: "
             f"{shared}.", "", "![Held-out accuracy per round](compare.png)", "",
             "Vector version: [compare.pdf](compare.pdf).", "",
             "| run | " + "".join(f"{k} | " for k in keys)
             + "final accuracy | total_bytes_up | total_bytes_up_wire_est | epsilon |",
             "|---|" + "---|" * len(keys) + "---:|---:|---:|---:|"]
    for run in runs:
        s = run.summary
        epsilon = cell(s.get("epsilon"), ".3g")
        if s.get("epsilon") is not None and s.get("delta") is not None:
            epsilon += f" (delta {s['delta']:g})"
        lines.append(f"| {run.path} | " + "".join(f"{shown(run.config.get(k))} | " for k in keys)
                     + f"{cell(s.get('final_accuracy'), '.4f')} | "
                     f"{cell(s.get('total_bytes_up'), ',')} | "
                     f"{cell(s.get('total_bytes_up_wire_est'), ',')} | {epsilon} |")
    return "\n".join([*lines, ""])


def write_comparison(paths: Sequence[str | Path], out: str | Path) -> Comparison:
    """compare.png, compare.pdf and compare.md of the runs in ``paths``, in ``out``."""
    runs = [load_run(Path(p)) for p in paths]  # all read before anything is written
    keys = differing_keys(runs)
    shared = ", ".join(f"{k}={runs[0].config[k]}" for k in SHARED
                       if k in runs[0].config and k not in keys) or "—"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with paper():
        fig = figure()
        ax = fig.add_subplot()
        for i, run in enumerate(runs):
            ax.plot([r["round"] for r in run.rounds], [r["accuracy"] for r in run.rounds],
                    ls=STYLES[i // 10 % len(STYLES)], marker="o", ms=2.5, lw=1.2,
                    label=label(run, keys))
        ax.set(xlabel="round", ylabel="held-out accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        ax.set_title(f"shared: {shared}", loc="left", fontsize=8)
        fig.suptitle(f"Held-out accuracy per round, {len(runs)} runs")
        labels = legend_below(fig, ax)
        save(fig, folder / "compare.png")
    report = folder / "compare.md"
    report.write_text(markdown(runs, keys, shared), encoding="utf-8")
    return Comparison(report, keys, labels)
