"""The `smallfed` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import tomllib
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from smallfed.config import Config, ConfigError, describe_keys, parse_override

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)


def quickstart() -> dict[str, Any]:
    """The quickstart's values (simulations/quickstart.toml), shipped inside the package
    so that the defaults are the same whichever folder `smallfed` runs in."""
    return tomllib.loads(resources.files("smallfed").joinpath("quickstart.toml").read_text())


def load_config(path: str | None, overrides: list[str]) -> Config:
    """The run configuration: a TOML file (the quickstart by default) plus ``--set`` values."""
    values = dict(parse_override(o) for o in overrides)
    if path is None:
        return Config.from_mapping({**quickstart(), **values})
    return Config.from_toml(path, values)


def print_error(prefix: str, message: str) -> None:
    """A red prefix, then the message as plain text: rich markup would turn a codec's
    ``:global`` into an emoji and drop a ``[...]``."""
    Console(stderr=True, soft_wrap=True).print(Text(prefix, style="bold red"), Text(message))


def stopped_simulation(out: Path) -> str:
    """The one line a Ctrl-C leaves: where the finished rounds are and how to go on."""
    from smallfed.flower.checkpoint import require

    try:
        require(out)
    except ConfigError:
        return f"before the first checkpoint, nothing in {out} to resume"
    return (f"the finished rounds are in {out / 'results.json'}; "
            f"go on with: smallfed simulate --resume {out}")


def exit_if_threads_linger() -> None:
    """End the process now if threads outlive a Ctrl-C: Flower's Ray engine leaves its
    ServerApp thread waiting for replies from the stopped clients (10 min a round), and
    it would then go on with the run in the background, into the folder to resume."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)  # pylint: disable=protected-access


def cmd_simulate(args: argparse.Namespace) -> int:
    from smallfed.report import print_rounds
    from smallfed.report.plots import plot_rounds
    from smallfed.simulation import simulate

    console = Console()
    if args.device:
        args.set.append(f"device={args.device}")
    if args.resume:
        from smallfed.flower.checkpoint import load

        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume DIR writes into DIR; drop --out")
        if args.overwrite:
            raise ConfigError("--resume goes on from DIR's checkpoint, --overwrite starts "
                              "afresh; drop one")
        out = Path(args.resume)
        saved = load(out).config
        if args.config:
            cfg = load_config(args.config, args.set)
        else:  # --set changes the checkpoint's own configuration (and is refused if it does)
            cfg = Config.from_mapping({**saved, **dict(parse_override(o) for o in args.set)})
    else:
        cfg = load_config(args.config, args.set)
        out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        results = simulate(cfg, out, progress=not args.no_progress, resume=bool(args.resume),
                           overwrite=args.overwrite)
    except KeyboardInterrupt:
        print_error("interrupted:", stopped_simulation(out))
        exit_if_threads_linger()
        return INTERRUPTED
    print_rounds(results, console)
    plot_rounds(results, out / "accuracy.png")
    console.print(f"results: {out / 'results.json'}, {out / 'rounds.csv'}, {out / 'accuracy.png'} "
                  "(and .pdf)")
    if cfg.export != "none":
        report = json.loads((out / f"model{'.int8' if cfg.export == 'int8' else ''}.json")
                            .read_text())
        console.print(f"model: {report['path']} ({report['precision']}, "
                      f"{report['file_bytes']:,} bytes, {report['nonzero_params']:,} nonzero "
                      f"parameters, onnxruntime accuracy {report['onnx_accuracy']:.4f}, "
                      f"torch {report['torch_accuracy']:.4f})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from smallfed.compact.export import export_run

    report = export_run(args.run, args.output, int8=args.int8)
    table = Table(title=f"exported {report.path} ({report.precision})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("file size", f"{report.file_bytes:,} bytes"),
        ("parameters (nonzero)", f"{report.params:,} ({report.nonzero_params:,})"),
        ("multiply-accumulates per image", f"{report.macs:,}"),
        (f"torch accuracy ({report.test_images} held-out images)", f"{report.torch_accuracy:.4f}"),
        ("onnxruntime accuracy", f"{report.onnx_accuracy:.4f}"),
        ("same prediction as torch", f"{report.prediction_agreement:.2%}"),
    ]
    if report.codebook_bytes is not None:
        rows.append(("shared layers as indices + codebooks", f"{report.codebook_bytes:,} bytes"))
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from smallfed.compact.predict import predict

    rows = predict(args.model, args.input)
    lines = ["input,class,probability"] + [f"{n},{c},{p:.4f}" for n, c, p in rows]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from smallfed.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, ray_address=args.ray_address)
    try:
        table = run_sweep(sweep, progress=not args.no_progress)
    except RuntimeError as err:  # some points failed; the others are in the table
        print_error("error:", str(err))
        return 1
    except KeyboardInterrupt:  # run_sweep has dropped the queued points
        again = f" --ray-address {args.ray_address}" if args.ray_address else ""
        print_error("interrupted:", f"the finished points are in {sweep.out / 'sweep.csv'}; "
                    f"go on with: smallfed sweep --config {args.config}{again}")
        return INTERRUPTED
    Console().print(f"{len(sweep.points)} points: {table}; plots: smallfed report {sweep.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from smallfed.report.compare import sweep_folder, write_comparison
    from smallfed.report.tradeoff import write_report

    sweep = sweep_folder(args.paths)  # refuses a bad mix before anything is written
    if sweep is not None:
        report = write_report(sweep, args.out).path
    else:
        report = write_comparison(args.paths, args.out or "report").path
    Console().print(f"report: {report}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from smallfed.deploy import certs, launch

    console = Console()
    try:
        if args.action == "certs":
            made = certs.make_certificates(args.out, args.host)
            console.print(f"CA and SuperLink certificate for {', '.join(args.host)}: "
                          f"{', '.join(str(p) for p in made.values())}")
        elif args.action == "node-key":
            private, public = certs.make_node_key(args.out, args.name)
            console.print(f"node key: {private} (stays on the device), {public} (register it: "
                          f"flwr supernode register {public} <superlink connection>)")
        else:
            if args.insecure:
                Console(stderr=True).print(f"[bold red]{launch.INSECURE_WARNING}[/]")
            command = launch.superlink_command(args.certs, args.host, args.port, args.database,
                                               args.insecure)
            print(" ".join(command), flush=True)  # plain: a command line to copy
            if not args.dry_run:
                launch.exec_command(command)
    except (FileExistsError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    from smallfed.deploy import launch

    console = Console()
    console.print(f"device check: {launch.check_device(args.data_dir, args.profile, args.model, args.batch_size)}")
    if warning := launch.memory_warning():
        Console(stderr=True).print(f"[bold yellow]WARNING: {warning}[/]")
    if args.insecure:
        Console(stderr=True).print(f"[bold red]{launch.INSECURE_WARNING}[/]")
    floor = launch.privacy_floor(args.dp_max_epsilon, args.dp_min_noise, args.dp_max_delta,
                                 args.dp_records or launch.default_records(args.data_dir))
    has_floor = any(v is not None for v in (args.dp_max_epsilon, args.dp_min_noise,
                                            args.dp_max_delta))
    console.print(launch.ledger_summary(args.data_dir, has_floor))
    if floor:
        console.print("privacy floor: " + ", ".join(f"{k} {v}" for k, v in floor.items()))
    command = launch.supernode_command(args.superlink, args.data_dir, args.profile,
                                       args.root_cert, args.auth_key, args.port, args.insecure,
                                       floor)
    print(" ".join(command), flush=True)  # plain: a command line to copy
    if not args.dry_run:
        launch.exec_command(command)
    return 0


def cmd_keys(_: argparse.Namespace) -> int:
    table = Table(title="smallfed configuration keys")
    for name in ("key", "default", "meaning"):
        table.add_column(name)
    for row in describe_keys():
        table.add_row(*map(Text, row))  # plain: a doc's "[a | b]" (its choices) is not markup
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallfed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation")
    sim.add_argument("--config", help="run configuration (TOML); default: the quickstart "
                     "(simulations/quickstart.toml, also inside the package)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration key (repeatable)")
    sim.add_argument("--out", help="results folder (default runs/<date-time>)")
    sim.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --out that holds a run's results or checkpoint")
    sim.add_argument("--no-progress", action="store_true", help="no progress bars")
    sim.add_argument("--device", choices=["cpu", "cuda", "auto"],
                     help="where the cohort engine trains (same as --set device=...)")
    sim.add_argument("--resume", metavar="DIR",
                     help="go on from the checkpoint of an interrupted run in DIR")
    sim.set_defaults(func=cmd_simulate)
    export = sub.add_parser("export", help="export a run's model to ONNX for devices")
    export.add_argument("--run", required=True, help="a run folder with a checkpoint")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--int8", action="store_true", help="int8 (onnxruntime static quantization)")
    export.add_argument("--output", required=True, help="the .onnx file to write")
    export.set_defaults(func=cmd_export)
    pred = sub.add_parser("predict", help="classify images or feature rows with an exported "
                          "model (onnxruntime)")
    pred.add_argument("--model", required=True, help="an .onnx file from `smallfed export`")
    pred.add_argument("--input", required=True,
                      help="a folder of images, an .npy array (N, C, H, W) in [0, 1], or an "
                      ".npy or .csv of (N, F) features for a tabular model")
    pred.add_argument("--output", help="CSV file (default: print)")
    pred.set_defaults(func=cmd_predict)
    sweep = sub.add_parser("sweep", help="run a grid of simulations (skips finished points)")
    sweep.add_argument("--config", required=True, help="a sweep file, e.g. "
                       "simulations/sweep-tradeoff.toml")
    sweep.add_argument("--ray-address", metavar="HOST:PORT",
                       help="run every point as a task on this Ray cluster (the head's "
                       "address); replaces the sweep file's ray-address")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(func=cmd_sweep)
    report = sub.add_parser("report", help="a sweep's trade-off plots and report.md, or "
                            "several runs' accuracy curves in one figure and compare.md")
    report.add_argument("paths", nargs="+", metavar="PATH",
                        help="one sweep's out folder (with sweep.csv), or one or more run "
                        "folders (each with results.json)")
    report.add_argument("--out", help="folder to write into (default: the sweep's folder for "
                        "a sweep, ./report for runs)")
    report.set_defaults(func=cmd_report)
    deploy = sub.add_parser("deploy", help="certificates, node keys and the SuperLink")
    actions = deploy.add_subparsers(dest="action", required=True)
    certs = actions.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem, keys")
    certs.add_argument("--host", action="append", required=True,
                       help="a name or IP address SuperNodes dial (repeatable)")
    node_key = actions.add_parser("node-key", help="a SuperNode's key pair")
    node_key.add_argument("--out", required=True)
    node_key.add_argument("--name", required=True)
    superlink = actions.add_parser("superlink", help="start the SuperLink: TLS, node auth")
    superlink.add_argument("--certs", help="folder made by `smallfed deploy certs`")
    superlink.add_argument("--host", default="0.0.0.0")
    superlink.add_argument("--port", type=int, default=8000)
    superlink.add_argument("--database", default="superlink.db")
    superlink.add_argument("--insecure", action="store_true",
                           help="plain HTTP, no node authentication: closed test networks only")
    superlink.add_argument("--dry-run", action="store_true", help="print the command only")
    deploy.set_defaults(func=cmd_deploy)
    edge = sub.add_parser("edge", help="run this device as a SuperNode")
    edge_actions = edge.add_subparsers(dest="action", required=True)
    start = edge_actions.add_parser("start", help="check the device, then start its SuperNode")
    start.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    start.add_argument("--data-dir", required=True, help="folder with this device's data.npz")
    start.add_argument("--profile", default="rpi4", help="device profile (smallfed keys)")
    start.add_argument("--root-cert", help="the federation's ca.crt")
    start.add_argument("--auth-key", help="this node's private key (smallfed deploy node-key)")
    start.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port")
    start.add_argument("--model", default="cnn-tiny", help="model to check memory for")
    start.add_argument("--batch-size", type=int, default=8)
    start.add_argument("--insecure", action="store_true", help="plain HTTP (test networks)")
    start.add_argument("--dp-max-epsilon", type=float,
                       help="privacy floor: the most epsilon this device spends, over all runs "
                            "(it then trains only under sample-level DP and never evaluates)")
    start.add_argument("--dp-min-noise", type=float,
                       help="privacy floor: the smallest DP-SGD noise multiplier it accepts")
    start.add_argument("--dp-max-delta", type=float,
                       help="privacy floor: the largest delta it accepts")
    start.add_argument("--dp-records", type=int,
                       help="the public record count DP-SGD is planned for; the server may "
                            "learn it (default: this device's count now, rounded up to a power "
                            "of two)")
    start.add_argument("--dry-run", action="store_true", help="check and print only")
    edge.set_defaults(func=cmd_edge)
    keys = sub.add_parser("keys", help="list every configuration key")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print_error("configuration error:", str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
