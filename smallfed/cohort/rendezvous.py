"""Where a round's ClientApp calls meet to train as one batch.

The in-process Grid delivers a round's train messages on one thread each. Every
ClientApp runs its handler as usual (mods, ledgers, refusals, codecs) until it trains:
there :func:`smallfed.training.train` (or DP-SGD's core) hands its job to the cohort
and waits. When no thread of the cohort is still running, the last one to arrive
trains every waiting job at once (:func:`smallfed.cohort.trainer.train_cohort`) and
the handlers go on with their trained models. A handler that declines, fails, or
trains something the batch cannot hold (it calls :func:`sequential`) just runs,
one at a time, so the batch always holds exactly the clients that reached training.

The ClientApp code is unchanged by this: the cohort is a property of the engine, as
Flower's engines decide how ClientApps run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:  # the trainer imports smallfed.training, which imports this module
    from smallfed.cohort.trainer import Job
    from smallfed.training import TrainResult

T = TypeVar("T")
_log = logging.getLogger("flwr")
_local = threading.local()


class _Slot:
    def __init__(self, position: int, job: Job) -> None:
        self.position, self.job = position, job
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.done = False


class Cohort:
    """Runs tasks on one thread each; the jobs they submit train together."""

    def __init__(self, device: torch.device, threads: int) -> None:
        self.device, self.threads = device, threads
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: list[_Slot] = []
        self._compute = threading.Lock()  # torch work of the cohort's threads, one at a time
        self._said: set[str] = set()

    def run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Each task's result (a task must not raise), in order."""
        results: list[T | None] = [None] * len(tasks)
        self._running = len(tasks)

        def work(position: int, task: Callable[[], T]) -> None:
            _local.cohort, _local.position = self, position
            try:
                results[position] = task()
            finally:
                _local.cohort = None
                with self._cond:
                    self._running -= 1
                    self._train_if_all_wait()

        threads = [threading.Thread(target=work, args=(i, task), daemon=True)
                   for i, task in enumerate(tasks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results  # type: ignore[return-value]

    def train(self, job: Job, sequential: Callable[[], TrainResult]) -> TrainResult:
        """``job`` trained in the batch, or by ``sequential`` when the batch cannot hold it."""
        from smallfed.cohort.trainer import refusal  # pylint: disable=import-outside-toplevel

        reason = refusal(job)
        if reason:
            with self.sequential(reason):
                return sequential()
        return self._wait(job)

    def _wait(self, job: Job) -> TrainResult:
        """Wait for the batch that trains ``job``; its result."""
        slot = _Slot(_local.position, job)
        with self._cond:
            self._waiting.append(slot)
            self._running -= 1
            self._train_if_all_wait()
            while not slot.done:
                self._cond.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    @contextmanager
    def sequential(self, reason: str) -> Iterator[None]:
        """Train one client outside the batch, alone and on one thread, saying once why."""
        with self._cond:
            first = reason not in self._said
            self._said.add(reason)
        if first:
            _log.warning("cohort engine: %s; these clients train one after another", reason)
        with self._compute, threads(1):
            yield

    def _train_if_all_wait(self) -> None:
        """With the condition held: when no thread still runs, train the waiting jobs."""
        if self._running or not self._waiting:
            return
        slots = sorted(self._waiting, key=lambda s: s.position)
        self._waiting = []
        from smallfed.cohort.trainer import train_cohort  # pylint: disable=import-outside-toplevel

        try:
            with self._compute, threads(self.threads):
                results = train_cohort([s.job for s in slots], self.device)
            for slot, result in zip(slots, results):
                slot.result = result
        except Exception as err:  # pylint: disable=broad-exception-caught
            for slot in slots:  # every client of the batch fails with it, as each would
                slot.error = err
        for slot in slots:
            slot.done = True
        self._running += len(slots)
        self._cond.notify_all()


def resolve_device(name: str) -> torch.device:
    """The device named by the ``device`` key; ConfigError when it is not there."""
    from smallfed.config import ConfigError  # pylint: disable=import-outside-toplevel

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA device here; use device = "
                          "auto (cuda when present) or cpu")
    return torch.device(name)


def current() -> Cohort | None:
    """The cohort this thread's ClientApp call belongs to, if any."""
    return getattr(_local, "cohort", None)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
