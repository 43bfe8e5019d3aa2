"""The `smallfed` command."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from smallfed.config import Config, ConfigError, describe_keys, parse_override

DEFAULT_CONFIG = Path("simulations/quickstart.toml")


def load_config(path: str | None, overrides: list[str]) -> Config:
    """The run configuration: a TOML file (quickstart by default) plus ``--set`` values."""
    values = dict(parse_override(o) for o in overrides)
    if path is None:
        if DEFAULT_CONFIG.is_file():
            return Config.from_toml(DEFAULT_CONFIG, values)
        return Config.from_mapping(values)  # the defaults are the quickstart's
    return Config.from_toml(path, values)


def cmd_simulate(args: argparse.Namespace) -> int:
    from smallfed.report import print_rounds
    from smallfed.report.plots import plot_rounds
    from smallfed.simulation import simulate

    console = Console()
    if args.resume:
        from smallfed.flower.checkpoint import load

        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume DIR writes into DIR; drop --out")
        out = Path(args.resume)
        saved = Config.from_mapping(load(out).config)
        cfg = load_config(args.config, args.set) if args.config or args.set else saved
    else:
        cfg = load_config(args.config, args.set)
        out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    results = simulate(cfg, out, progress=not args.no_progress, resume=bool(args.resume))
    print_rounds(results, console)
    plot_rounds(results, out / "accuracy.png")
    console.print(f"results: {out / 'results.json'}, {out / 'rounds.csv'}, {out / 'accuracy.png'}")
    return 0


def cmd_keys(_: argparse.Namespace) -> int:
    table = Table(title="smallfed configuration keys")
    for name in ("key", "default", "meaning"):
        table.add_column(name)
    for row in describe_keys():
        table.add_row(*row)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallfed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation")
    sim.add_argument("--config", help=f"run configuration (TOML); default {DEFAULT_CONFIG}")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration key (repeatable)")
    sim.add_argument("--out", help="results folder (default runs/<date-time>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bars")
    sim.add_argument("--resume", metavar="DIR",
                     help="go on from the checkpoint of an interrupted run in DIR")
    sim.set_defaults(func=cmd_simulate)
    keys = sub.add_parser("keys", help="list every configuration key")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        Console(stderr=True).print(f"[bold red]configuration error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
