"""Plots of a run, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and boards
import matplotlib.pyplot as plt  # noqa: E402


def plot_rounds(results: dict[str, Any], path: str | Path) -> Path:
    """Held-out accuracy and cumulative upload bytes per round, as a PNG."""
    rounds = results["rounds"]
    x = [r["round"] for r in rounds]
    uploaded, total = [], 0
    for r in rounds:
        total += r["bytes_up"]
        uploaded.append(total / 1e6)
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc_ax.plot(x, [r["accuracy"] for r in rounds], marker="o", ms=3)
    acc_ax.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1))
    bytes_ax.plot(x, uploaded, marker="o", ms=3, color="tab:orange")
    bytes_ax.set(xlabel="round", ylabel="uploaded (MB, cumulative)")
    cfg = results["config"]
    fig.suptitle(f"{cfg['model']} on {cfg['dataset']}, {cfg['num-clients']} clients, "
                 f"{cfg['strategy']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
