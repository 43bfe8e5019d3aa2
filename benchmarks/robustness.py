"""Robustness to hostile but authenticated clients on MNIST (issue 14).

On simulations/mnist.toml (100 clients, 10 a round; needs ../shared/data/mnist), the
real ServerApp runs on the in-process Grid wrapped in smallfed.attacks.AttackGrid:

* the honest run, then one run per attack with the same seed, 1 attacker sampled
  every round (drawn among that round's 10 clients); target: every round completes
  and the final accuracy is within 1 point of the honest run, default settings;
* a robust-aggregator section: 3 attackers of the 10 each round under fedmedian,
  multikrum (malicious-clients = 3) and fedtrimmedavg (trim-beta = 0.3), each against
  its own honest run; target: within 3 points;
* memory: the peak RSS of the run with the 1 GiB reply (oversize:1GiB) against the
  honest run's. In-process the attacker's buffer lives in the ServerApp's process (in
  a deployment it would live on the SuperNode, and the SuperLink and ServerApp would
  hold what they copy of it), so the target is on the peak less that one buffer:
  what the server itself added must stay below 2x the honest peak. Both are printed.

Every run is a fresh spawned process: its peak RSS is its own ``ru_maxrss``. The
outcome counts rejected updates (results.json) and the warnings of the log that name
an attacking node, with their most common reason. Writes JSON (default
benchmarks/results/robustness.json), prints one line per run and a markdown table, and
exits 1 when a target is missed.

    python benchmarks/robustness.py [--rounds 30] [--attacks scale:1e6 ...] [--out FILE]
    python benchmarks/robustness.py --rounds 3   # a quick check (targets mean little)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import re
import resource
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTACKS = ["scale:1e6", "scale:1e3", "signflip:10", "examples:1e9", "examples:1.7e308",
           "float64", "shape", "scalar", "duplicate:5", "nan", "oversize:1GiB"]
ROBUST_STRATEGIES = ["fedmedian", "multikrum", "fedtrimmedavg"]
ROBUST_ATTACKS = ["scale:1e6", "signflip:10"]
TARGET_POINTS = {"default": 1.0, "robust": 3.0}
MEMORY_FACTOR = 2.0


@dataclass
class Point:
    """One run: a section, its inner strategy, an attack (None: honest) and attackers."""

    section: str
    strategy: str
    attack: str | None
    attackers: int

    @property
    def name(self) -> str:
        who = f"{self.attack} x{self.attackers}" if self.attack else "honest"
        return f"{self.strategy}: {who}"


@dataclass
class Outcome:
    point: Point
    rounds_done: int = 0
    rounds_aggregated: int = 0  # rounds after round 0 that aggregated at least 1 update
    rejected: int = 0
    clipped: int = 0
    rolled_back: int = 0
    named: int = 0  # log lines that name an attacking node
    reasons: list[tuple[str, int]] = field(default_factory=list)
    hits: int = 0  # replies the attackers rewrote
    accuracies: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    attacker_buffer_mb: float = 0.0  # the oversize attack's buffer, in this process
    wall_s: float = 0.0
    error: str | None = None

    @property
    def final(self) -> float:
        return self.accuracies[-1] if self.accuracies else float("nan")


def config_of(rounds: int, point: Point):  # type: ignore[no-untyped-def]
    from smallfed.cli import load_config

    cfg = load_config(str(ROOT / "simulations/mnist.toml"), []).replace(
        num_server_rounds=rounds, strategy=point.strategy)
    if point.strategy in ("krum", "multikrum", "bulyan"):
        cfg = cfg.replace(malicious_clients=3)
    if point.strategy == "fedtrimmedavg":
        cfg = cfg.replace(trim_beta=0.3)  # cut 3 of 10 from each end: all 3 attackers
    return cfg


class LogCount(logging.Handler):
    """Keeps the lines of Flower's log that name a node (INFO and above: a clipped
    update is logged at INFO, a rejected one at WARNING, a rolled-back round at ERROR)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_node: list[tuple[set[int], str]] = []  # (nodes named, the line's gist)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        nodes = {int(n) for n in re.findall(r"node (\d+)", text)}
        if nodes:
            gist = re.sub(r"^Round \d+:?\s*", "", text)
            gist = re.sub(r"\b\d+(?:[.,]\d+)*(?:e[-+]?\d+)?\b", "#", gist)
            self.by_node.append((nodes, gist[:120]))


def run_point(rounds: int, point: Point, keep: str | None, events: Any) -> None:
    """Run one point in this (fresh) process and put its Outcome on ``events``."""
    import warnings

    warnings.filterwarnings("ignore")
    os.chdir(ROOT)
    from smallfed.attacks import AttackGrid
    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.server import build_server_app

    flwr = logging.getLogger("flwr")
    for handler in list(flwr.handlers):
        flwr.removeHandler(handler)
    flwr.setLevel(logging.INFO)
    flwr.propagate = False
    counter = LogCount()
    flwr.addHandler(counter)
    outcome = Outcome(point)
    cfg = config_of(rounds, point)
    started = time.perf_counter()
    with TemporaryDirectory() as tmp:
        out = Path(keep) / point.name.replace(": ", "-").replace(" ", "") if keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        logfile = logging.FileHandler(out / "server.log")
        logfile.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        flwr.addHandler(logfile)
        inner = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
        grid = (AttackGrid(inner, point.attack, attackers_per_round=point.attackers,
                           seed=cfg.seed, codec=cfg.codec) if point.attack else inner)
        app = build_server_app(cfg, out, on_round=lambda r, _: events.put(("round", r.round)))
        try:
            app(grid, inner.server_context())
        except Exception as err:  # pylint: disable=broad-exception-caught
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            outcome.error = last[:200]
        results = out / "results.json"
        table = json.loads(results.read_text())["rounds"] if results.is_file() else []
        outcome.accuracies = [r["accuracy"] for r in table]
        outcome.rounds_done = max(0, len(table) - 1)
        outcome.rounds_aggregated = sum(1 for r in table[1:] if r["clients"] > 0)
        outcome.rejected = sum(r.get("updates_rejected", 0) for r in table)
        outcome.clipped = sum(r.get("updates_clipped", 0) for r in table)
        outcome.rolled_back = sum(r.get("rolled_back", 0) for r in table)
        if isinstance(grid, AttackGrid):
            attackers = {h.node_id for h in grid.hits}
            outcome.hits = len(grid.hits)
            named = [gist for nodes, gist in counter.by_node if nodes & attackers]
            outcome.named = len(named)
            outcome.reasons = Counter(named).most_common(2)
            outcome.attacker_buffer_mb = grid.held_bytes() / 2**20
    outcome.wall_s = time.perf_counter() - started
    outcome.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    events.put(("done", asdict(outcome)))


def run_all(rounds: int, points: list[Point], keep: str | None) -> list[Outcome]:
    context = multiprocessing.get_context("spawn")
    outcomes = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn())
    with progress:
        runs = progress.add_task("runs", total=len(points))
        for point in points:
            progress.update(runs, description=f"runs  [{point.name}]")
            bar = progress.add_task("  rounds", total=rounds)
            events = context.Queue()
            child = context.Process(target=run_point, args=(rounds, point, keep, events))
            child.start()
            outcome = None
            while outcome is None:
                try:
                    kind, value = events.get(timeout=1.0)
                except queue.Empty:
                    if not child.is_alive():
                        outcome = Outcome(point, error=f"the run's process died "
                                                       f"(exit code {child.exitcode})")
                    continue
                if kind == "round":
                    progress.update(bar, completed=value)
                else:
                    value["point"] = Point(**value["point"])
                    value["reasons"] = [tuple(r) for r in value["reasons"]]
                    outcome = Outcome(**value)
            child.join()
            progress.remove_task(bar)
            progress.advance(runs)
            outcomes.append(outcome)
            progress.console.print(line(outcome, honest_of(outcomes, point)))
    return outcomes


def honest_of(outcomes: list[Outcome], point: Point) -> Outcome | None:
    return next((o for o in outcomes if o.point.attack is None
                 and o.point.strategy == point.strategy), None)


def verdict(outcome: Outcome, honest: Outcome | None, rounds: int) -> tuple[bool, str]:
    """(met, why not) for an attacked run against its honest twin."""
    if outcome.point.attack is None:
        return (outcome.error is None and outcome.rounds_done == rounds, outcome.error or "")
    misses = []
    if outcome.error:
        misses.append(f"crashed: {outcome.error}")
    if outcome.rounds_aggregated < rounds:
        misses.append(f"{rounds - outcome.rounds_aggregated} of {rounds} rounds aggregated "
                      "nothing or did not run")
    limit = TARGET_POINTS["robust" if outcome.point.section == "robust" else "default"]
    if honest is not None and (honest.final - outcome.final) * 100 > limit:
        misses.append(f"accuracy {100 * (outcome.final - honest.final):+.2f} points "
                      f"(limit -{limit:g})")
    return not misses, "; ".join(misses)


def memory(outcome: Outcome, honest: Outcome | None) -> tuple[float, float] | None:
    """(peak / honest peak, (peak - the attacker's buffer) / honest peak) for oversize."""
    if honest is None or not outcome.attacker_buffer_mb:
        return None
    return (outcome.peak_rss_mb / honest.peak_rss_mb,
            (outcome.peak_rss_mb - outcome.attacker_buffer_mb) / honest.peak_rss_mb)


def describe(outcome: Outcome) -> str:
    if outcome.error and not outcome.accuracies:
        return f"crashed: {outcome.error}"
    text = (f"{outcome.rounds_aggregated}/{max(outcome.rounds_done, 0)} rounds aggregated, "
            f"{outcome.rejected} rejected")
    if outcome.clipped:
        text += f", {outcome.clipped} clipped"
    if outcome.rolled_back:
        text += f", {outcome.rolled_back} rolled back"
    if outcome.point.attack:
        text += f", {outcome.named} log lines name an attacker"
        if outcome.reasons:
            text += f" ({outcome.reasons[0][0]!r})"
    if outcome.error:
        text += f"; crashed: {outcome.error}"
    return text


def line(outcome: Outcome, honest: Outcome | None) -> str:
    versus = ""
    if outcome.point.attack and honest is not None:
        versus = f" vs {honest.final:.4f} ({100 * (outcome.final - honest.final):+.2f} pts)"
    mem = memory(outcome, honest)
    mem_text = (f", peak {outcome.peak_rss_mb:.0f} MB = {mem[0]:.2f}x honest, "
                f"{mem[1]:.2f}x less the attacker's buffer" if mem else "")
    return (f"{outcome.point.name} -> {describe(outcome)} -> {outcome.final:.4f}{versus}"
            f"{mem_text}")


def table(outcomes: list[Outcome], rounds: int) -> str:
    rows = ["| section | strategy | attack | outcome | final accuracy | vs honest | "
            "peak RSS | target |", "|---|---|---|---|---|---|---|---|"]
    for outcome in outcomes:
        honest = honest_of(outcomes, outcome.point)
        met, why = verdict(outcome, honest, rounds)
        mem = memory(outcome, honest)
        if mem is not None and mem[1] >= MEMORY_FACTOR:
            met, why = False, "; ".join(filter(None, [why, f"memory {mem[1]:.2f}x"]))
        attack = (f"{outcome.point.attack} x{outcome.point.attackers}"
                  if outcome.point.attack else "none (honest)")
        diff = (f"{100 * (outcome.final - honest.final):+.2f} pts"
                if outcome.point.attack and honest else "")
        peak = f"{outcome.peak_rss_mb:.0f} MB"
        if mem is not None:
            peak += f" ({mem[0]:.2f}x; {mem[1]:.2f}x without the attacker's buffer)"
        rows.append(f"| {outcome.point.section} | {outcome.point.strategy} | {attack} | "
                    f"{describe(outcome).replace('|', '/')} | {outcome.final:.4f} | {diff} | "
                    f"{peak} | {'met' if met else 'MISSED: ' + why} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--attacks", nargs="*", default=ATTACKS,
                        help="default-settings section, 1 attacker a round")
    parser.add_argument("--robust-strategies", nargs="*", default=ROBUST_STRATEGIES,
                        help="robust section (none: skip it)")
    parser.add_argument("--robust-attacks", nargs="*", default=ROBUST_ATTACKS,
                        help="robust section, 3 attackers a round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/robustness.json"))
    parser.add_argument("--keep", default=None, help="keep each run's folder (and log) here")
    args = parser.parse_args()
    from smallfed.attacks import parse_attack

    for spec in [*args.attacks, *args.robust_attacks]:
        parse_attack(spec)  # refuse a typo before the first run
    points = [Point("default", "fedavg", None, 0)]
    points += [Point("default", "fedavg", a, 1) for a in args.attacks]
    for strategy in args.robust_strategies:
        points.append(Point("robust", strategy, None, 0))
        points += [Point("robust", strategy, a, 3) for a in args.robust_attacks]
    outcomes = run_all(args.rounds, points, args.keep)
    print()
    print(f"MNIST (simulations/mnist.toml), {args.rounds} rounds, seed 42; "
          f"command: python benchmarks/robustness.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(table(outcomes, args.rounds))
    missed = []
    for outcome in outcomes:
        honest = honest_of(outcomes, outcome.point)
        met, why = verdict(outcome, honest, args.rounds)
        mem = memory(outcome, honest)
        if mem is not None and mem[1] >= MEMORY_FACTOR:
            met, why = False, "; ".join(filter(None, [why, f"memory {mem[1]:.2f}x"]))
        if not met:
            missed.append(f"{outcome.point.name}: {why}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": "simulations/mnist.toml", "rounds": args.rounds,
        "targets": {"points": TARGET_POINTS, "memory_factor": MEMORY_FACTOR},
        "runs": [{**asdict(o), "final": o.final} for o in outcomes],
        "missed": missed,
    }, indent=1) + "\n")
    print(f"\nwritten to {out}")
    if missed:
        print(f"\n{len(missed)} target(s) missed:\n  " + "\n  ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
