"""Experiment trackers (config key ``tracker``): each round's metrics and the run's summary,
also sent to TensorBoard, Weights & Biases or MLflow.

results.json is the record of a run; a tracker is a convenience. So its package is checked
before any work (by ``simulate``, and by the server before round 1), and a tracker that cannot start fails the run
before round 1; but one that fails later warns once and stops, and the run goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smallfed.config import Config, ConfigError

# tracker -> (the module it needs, the command that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", 'pip install "smallfed[tensorboard]"'),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def check_tracker(name: str) -> None:
    """ConfigError if the tracker's package is missing; found, not imported (they are heavy)."""
    if name not in PACKAGES:
        return
    module, command = PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracker: {name!r} needs the {module} package, which is not installed; "
            f"run `{command}`, or set tracker = 'none'")


def metrics(values: Mapping[str, Any], prefix: str) -> dict[str, int | float]:
    """The numeric fields as ``prefix/name``: None (not measured), flags and nested blocks
    are not metrics."""
    return {f"{prefix}/{k}": v for k, v in values.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Tracker:
    """tracker = 'none', and what every tracker does with a failure.

    Subclasses start their run in ``__init__`` and implement ``_log`` and ``_close``.
    """

    name = "none"

    def __init__(self, cfg: Config, out: Path) -> None:  # pylint: disable=unused-argument
        self.failed = False
        self._step = 0

    def log_round(self, record: Mapping[str, Any]) -> None:
        """A round's numeric fields, at step = its round number."""
        self._step = int(record["round"])
        values = metrics({k: v for k, v in record.items() if k != "round"}, "round")
        self._guard(self._log, values, self._step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The summary's numeric fields, at the last round logged."""
        self._guard(self._log_summary, metrics(summary, "summary"), self._step)

    def close(self) -> None:
        """End the tracker's run; after a failure quietly (it has warned)."""
        if not self.failed:
            self._guard(self._close)
            return
        with contextlib.suppress(Exception):
            self._close()

    def _log(self, values: dict[str, int | float], step: int) -> None:
        """Send ``values`` at ``step``."""

    def _log_summary(self, values: dict[str, int | float], step: int) -> None:
        self._log(values, step)

    def _close(self) -> None:
        """Flush and end the run."""

    def _guard(self, call: Callable[..., None], *args: Any) -> None:
        if self.failed:
            return
        try:
            call(*args)
        except Exception as err:  # pylint: disable=broad-exception-caught
            self.failed = True
            warnings.warn(
                f"tracker {self.name!r} failed ({type(err).__name__}: {err}); the run goes on "
                "without it, results.json has every round", RuntimeWarning, stacklevel=3)


class TensorBoardTracker(Tracker):
    """Event files in ``out/tensorboard``; a resumed run appends to the same folder."""

    name = "tensorboard"

    def __init__(self, cfg: Config, out: Path) -> None:
        super().__init__(cfg, out)
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only if used

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        # Indented four spaces, a Markdown code block: TOML to copy back into a run file.
        self.writer.add_text("config", "\n".join(
            f"    {k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()))

    def _log(self, values: dict[str, int | float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a stopped run keeps its finished rounds, as results.json does

    def _close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in project smallfed (or WANDB_PROJECT); WANDB_MODE and the rest apply."""

    name = "wandb"

    def __init__(self, cfg: Config, out: Path) -> None:
        super().__init__(cfg, out)
        import wandb  # pylint: disable=import-outside-toplevel

        out.mkdir(parents=True, exist_ok=True)
        # reinit: a run of an earlier simulation in this process is finished, not reused.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "smallfed"),
                              dir=str(out), name=out.name, config=cfg.to_dict(), reinit=True)

    def _log(self, values: dict[str, int | float], step: int) -> None:
        self.run.log(values, step=step)

    def _log_summary(self, values: dict[str, int | float], step: int) -> None:
        self.run.summary.update(values)

    def _close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run where MLFLOW_TRACKING_URI (and MLFLOW_EXPERIMENT_NAME) say, else
    MLflow's own default; nested in a run the caller has started."""

    name = "mlflow"

    def __init__(self, cfg: Config, out: Path) -> None:
        super().__init__(cfg, out)
        import mlflow  # pylint: disable=import-outside-toplevel

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=out.name, nested=True)
        try:
            mlflow.log_params(cfg.to_dict())
        except Exception:
            mlflow.end_run(status="FAILED")  # not left active for the next run to nest in
            raise

    def _log(self, values: dict[str, int | float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def _close(self) -> None:
        self.mlflow.end_run()


TRACKERS: dict[str, type[Tracker]] = {
    "none": Tracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker,
    "mlflow": MlflowTracker}


def open_tracker(cfg: Config, out: Path) -> Tracker:
    """The configured tracker, its run started; one that cannot start stops the run here,
    before round 1. Its package is checked here, on the server, and by ``simulate``
    before any work: not by Config, which devices build too and which need no tracker."""
    check_tracker(cfg.tracker)
    try:
        return TRACKERS[cfg.tracker](cfg, out)
    except Exception as err:
        raise RuntimeError(f"tracker: {cfg.tracker!r} could not start ({type(err).__name__}: "
                           f"{err}); fix that, or set tracker = 'none'") from err
