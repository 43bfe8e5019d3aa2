"""Plots of a run, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from smallfed.report.style import figure, paper, save


def privacy_text(config: dict[str, Any]) -> str:
    """The run's privacy in a few words: the guarantee it aimed at, or its noise."""
    level = config.get("privacy", "none")
    if level == "none":
        return "no DP"
    target = config.get("dp-target-epsilon", 0.0)
    aim = f"target epsilon {target:g}" if target else f"noise {config.get('dp-noise', 1.0):g}"
    return f"{level}-level DP, {aim}, delta {config.get('dp-delta', 1e-5):g}"


def run_title(config: dict[str, Any]) -> str:
    """What a run was, on two lines: what learned what, and how updates were sent."""
    return (f"{config['model']} on {config['dataset']}, {config['num-clients']} clients, "
            f"{config['strategy']}\ncodec {config.get('codec', 'none')}, "
            f"{privacy_text(config)}")


def cumulative_mb(rounds: list[dict[str, Any]], key: str) -> list[float]:
    """A per-round byte count summed over the rounds so far, in MB."""
    out, total = [], 0
    for r in rounds:
        total += r[key]
        out.append(total / 1e6)
    return out


def plot_rounds(results: dict[str, Any], path: str | Path) -> Path:
    """Held-out accuracy and cumulative upload bytes per round, as a PNG and a PDF
    beside it; the PNG's path."""
    rounds = results["rounds"]
    x = [r["round"] for r in rounds]
    with paper():
        fig = figure(figsize=(6.5, 3.2))
        acc_ax, bytes_ax = fig.subplots(1, 2)
        acc_ax.plot(x, [r["accuracy"] for r in rounds], marker="o", ms=3)
        acc_ax.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1))
        bytes_ax.plot(x, cumulative_mb(rounds, "bytes_up"), marker="o", ms=3,
                      color="tab:orange", label="payload")
        if "bytes_up_wire_est" in rounds[0]:  # results from before the wire estimate lack it
            bytes_ax.plot(x, cumulative_mb(rounds, "bytes_up_wire_est"), marker="o", ms=3,
                          color="tab:orange", mfc="none", ls="--", label="on the wire (est.)")
            bytes_ax.legend()
        bytes_ax.set(xlabel="round", ylabel="uploaded, cumulative (MB)")
        for ax in (acc_ax, bytes_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        fig.suptitle(run_title(results["config"]))
        png, _ = save(fig, Path(path))
    return png
