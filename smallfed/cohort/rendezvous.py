"""Where a round's ClientApp calls meet to train as one batch.

The in-process Grid delivers a round's train messages on one thread each. Every
ClientApp runs its handler as usual (mods, ledgers, refusals, codecs) until it trains:
there :func:`smallfed.training.train` (or DP-SGD's core) hands its job to the cohort
and waits. When every other call of the cohort waits too or has finished, the last
one to arrive trains every waiting job at once
(:func:`smallfed.cohort.trainer.train_cohort`) and the handlers go on with their
trained models. A handler that declines or fails just finishes; one that trains
something the batch cannot hold trains it itself, on one thread.

Only one call runs at a time: a thread holds the cohort's lock while it runs and
gives it up only while it waits for the batch. The handlers' global state (torch's
global generator, which model building seeds; torch's thread count; caches) is then
used as on the sequential path, and a DP client trained outside the batch cannot have
its noise drawn while another thread reseeds a generator. A handler must therefore
not wait, before it trains, on something another handler holds while training; the
in-process Grid refuses the one case there is (two nodes sharing a data folder, whose
privacy ledger lock a client holds across training).

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
    """Runs tasks on one thread each, one at a time; the jobs they submit train together."""

    def __init__(self, device: torch.device, threads: int) -> None:
        self.device, self.threads = device, threads
        self._turn = threading.Condition(threading.RLock())  # held by the running call
        self._running = 0  # calls neither waiting for the batch nor finished
        self._waiting: list[_Slot] = []
        self._said: set[str] = set()

    def run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Each task's result (a task must not raise), in order."""
        results: list[T | None] = [None] * len(tasks)
        self._running = len(tasks)

        def work(position: int, task: Callable[[], T]) -> None:
            with self._turn:
                _local.cohort, _local.position = self, position
                try:
                    results[position] = task()
                finally:
                    _local.cohort = None
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

        job.alone = sequential
        reason = refusal(job)
        if reason:
            return self.alone(reason, sequential)
        slot = _Slot(_local.position, job)
        with self._turn:
            self._waiting.append(slot)
            self._running -= 1
            self._train_if_all_wait()
            while not slot.done:
                self._turn.wait()  # the others run meanwhile
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def alone(self, reason: str, sequential: Callable[[], TrainResult]) -> TrainResult:
        """Train one client outside the batch, on one thread, saying once why."""
        self.say(f"{reason}; these clients train one after another")
        with threads(1):
            return sequential()

    def say(self, message: str) -> None:
        """Log ``message`` once per cohort (so once per run)."""
        if message not in self._said:
            self._said.add(message)
            _log.warning("cohort engine: %s", message)

    def _train_if_all_wait(self) -> None:
        """With the turn held: when no call still runs, train the waiting jobs."""
        if self._running or not self._waiting:
            return
        slots = sorted(self._waiting, key=lambda s: s.position)
        self._waiting = []
        from smallfed.cohort.trainer import train_cohort  # pylint: disable=import-outside-toplevel

        try:  # whatever happens, every waiting call gets an outcome, or it waits forever
            with threads(self.threads):
                outcomes: list = train_cohort([s.job for s in slots], self.device, self.say,
                                             lanes=self.threads)
        except Exception as err:  # pylint: disable=broad-exception-caught
            outcomes = [err] * len(slots)
        for slot, outcome in zip(slots, outcomes):
            if isinstance(outcome, BaseException):
                slot.error = outcome
            else:
                slot.result = outcome
            slot.done = True
        self._running += len(slots)
        self._turn.notify_all()


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
