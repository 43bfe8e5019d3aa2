"""`smallfed report`: seeds pooled with Student-t intervals, fronts on the means, every
omission explained, paper-ready PNG + PDF, and runs overlaid. Synthetic tables only."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from smallfed.cli import main
from smallfed.config import ConfigError
from smallfed.report.aggregate import configurations, mean_ci, pareto_front
from smallfed.report.compare import DEFAULTS, sweep_folder, write_comparison
from smallfed.report.plots import plot_rounds, run_title
from smallfed.report.style import RC
from smallfed.report.tradeoff import (BYTES, EPSILON, TIME, Panel, SweepReport, build_panel,
                                      draw, read_table, subtitle, write_report)

T_975 = {1: 12.706204736174698, 2: 4.302652729911275}  # Student t quantiles, by df
FIELDS = ["codec", "privacy", "point", "seed", "final_accuracy", "best_accuracy",
          "total_bytes_up", "compression_ratio_up", "epsilon", "sim_time_s",
          "sim_time_to_target_s", "wall_time_s", "node", "node_id"]
WIRE_FIELDS = ["total_bytes_up_wire_est", "compression_ratio_up_wire_est"]


def row(codec: str, privacy: str, seed: int, acc: float | str, up: int | str,
        ratio: float | str = 1.0, eps: float | str = "", target_s: float | str = "",
        sim: float | str = 10.0, wire: int | str = "") -> dict[str, Any]:
    return {"codec": codec, "privacy": privacy, "point": f"codec={codec},privacy={privacy},"
            f"seed={seed}", "seed": seed, "final_accuracy": acc, "best_accuracy": acc,
            "total_bytes_up": up, "compression_ratio_up": ratio, "epsilon": eps,
            "sim_time_s": sim, "sim_time_to_target_s": target_s, "wall_time_s": 1.0,
            "node": "", "node_id": "", "total_bytes_up_wire_est": wire,
            "compression_ratio_up_wire_est": ""}


# sign/none: its lucky seed 1 alone would be on the bytes front, its mean is not.
ROWS = [
    row("dense", "none", 1, 0.90, 1000, target_s=5),
    row("dense", "none", 2, 0.92, 1100, target_s=6),
    row("dense", "none", 3, 0.94, 1200, target_s=7),
    row("topk", "none", 1, 0.80, 40, 25, target_s=8),
    row("topk", "none", 2, 0.80, 40, 25, target_s=9),
    row("topk", "none", 3, 0.80, 40, 25),  # never reached the target
    row("sign", "none", 1, 0.99, 50, 20, target_s=3),
    row("sign", "none", 2, 0.30, 50, 20, target_s=4),
    row("sign", "none", 3, 0.30, 50, 20, target_s=5),
    row("dense", "eps-8", 1, 0.50, 1000, eps=8.0),
    row("dense", "eps-8", 2, 0.60, 1000, eps=8.0),
    row("dense", "eps-8", 3, "", "", "", sim=""),  # failed: empty cells
    row("sign", "eps-8", 1, 0.40, 50, 20, eps=7.5),  # a single seed
]


def write_sweep(folder: Path, rows: list[dict[str, Any]], fields: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    point = folder / "points" / "codec-dense__privacy-eps-8__seed-1"  # where delta is known
    point.mkdir(parents=True)
    (point / "results.json").write_text(json.dumps({"config": {
        "privacy": "sample", "dp-delta": 1e-5, "devices": "rpi4:1", "target-accuracy": 0.9}}))
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> SweepReport:
    sweep = write_sweep(tmp_path_factory.mktemp("sweep"), ROWS, FIELDS)
    return write_report(sweep, sweep / "out")


def panel_of(report: SweepReport, column: str) -> Panel:
    return next(p for p in report.panels if p.cost.column == column)


def test_mean_and_interval_are_the_hand_computed_student_t() -> None:
    three = mean_ci([0.90, 0.92, 0.94])
    assert three.n == 3 and three.mean == pytest.approx(0.92)
    assert three.half == pytest.approx(T_975[2] * 0.02 / math.sqrt(3))
    two = mean_ci([0.5, 0.6])
    assert two.half == pytest.approx(T_975[1] * math.sqrt(0.005) / math.sqrt(2))
    one = mean_ci([0.4])
    assert one.half is None and "no CI" in one.text(".2f")


def test_seeds_are_grouped_per_configuration_and_failed_seeds_kept_apart(
        report: SweepReport) -> None:
    by_name = {c.name: c for c in report.configurations}
    assert [c.label for c in report.configurations] == [
        "dense / none", "topk / none", "sign / none", "dense / eps-8", "sign / eps-8"]
    failed = by_name["codec=dense,privacy=eps-8"]
    assert len(failed.rows) == 2
    assert [r["point"] for r in failed.failed] == ["codec=dense,privacy=eps-8,seed=3"]
    point = {e.config.name: e for e in panel_of(report, "total_bytes_up").points}
    dense = point["codec=dense,privacy=none"]
    assert (dense.accuracy.mean, dense.cost.mean) == pytest.approx((0.92, 1100))
    assert dense.cost.half == pytest.approx(T_975[2] * 100 / math.sqrt(3))
    private = point["codec=dense,privacy=eps-8"]
    assert private.accuracy.n == 2 and private.accuracy.mean == pytest.approx(0.55)


def test_the_front_runs_through_means_not_single_seeds(report: SweepReport) -> None:
    seeds = [(float(r["total_bytes_up"]), float(r["final_accuracy"])) for r in ROWS
             if r["final_accuracy"] != ""]
    lucky = ROWS.index(next(r for r in ROWS if r["point"] == "codec=sign,privacy=none,seed=1"))
    assert lucky in pareto_front(seeds)  # the lucky seed alone would be on it
    panel = panel_of(report, "total_bytes_up")
    assert panel.front == {"codec=topk,privacy=none", "codec=dense,privacy=none"}
    assert panel.baseline == {"codec=dense,privacy=none", "codec=dense,privacy=eps-8"}


def test_one_legend_label_per_configuration_and_the_non_private_as_references(
        report: SweepReport) -> None:
    labels = [c.label for c in report.configurations]
    for panel in report.panels:
        shown = [e.config.label for e in panel.points]
        assert all(panel.legend.count(label) == 1 for label in shown), panel.legend
        assert set(panel.legend) <= {*labels, "Pareto front (means)",
                                     "dense baseline (compression ratio 1)",
                                     *(f"no DP (reference): {label}" for label in labels)}
    epsilon = panel_of(report, "epsilon")
    assert [e.config.label for e in epsilon.points] == ["dense / eps-8", "sign / eps-8"]
    assert [c.label for c, _ in epsilon.references] == ["dense / none", "topk / none",
                                                        "sign / none"]
    assert "no DP (reference): topk / none" in epsilon.legend
    assert epsilon.xlabel == "epsilon at delta=1e-05"


def test_png_and_pdf_are_written_at_paper_sizes(report: SweepReport) -> None:
    out = report.path.parent
    for name in ("accuracy_vs_bytes", "accuracy_vs_epsilon", "accuracy_vs_time"):
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:4] == b"%PDF"
    assert min(v for k, v in RC.items() if k.endswith("size")) >= 8


def test_report_md_tabulates_and_lists_every_omission(report: SweepReport) -> None:
    text = report.path.read_text(encoding="utf-8")
    for embedded in ("![Final accuracy against upload bytes](accuracy_vs_bytes.png)",
                     "[accuracy_vs_epsilon.pdf](accuracy_vs_epsilon.pdf)",
                     "![Final accuracy against simulated time to target](accuracy_vs_time.png)"):
        assert embedded in text
    assert ("| codec=dense,privacy=none | dense / none | 3 | 0.9200 ± 0.0497 | 1,100 ± 248 "
            "| yes |") in text  # 0.0497 = 4.3027 * 0.02 / sqrt(3)
    assert ("| codec=sign,privacy=eps-8 | sign / eps-8 | 1 | 0.4000 (1 seed, no CI) | "
            "7.5 (1 seed, no CI) | yes |") in text
    left_out = text.split("## Left out", 1)[1]
    assert "failed seed `codec=dense,privacy=eps-8,seed=3` (empty final_accuracy)" in left_out
    assert ("accuracy against simulated time to target: `topk / none` (codec=topk,privacy=none)"
            " left out: never reached target-accuracy 0.9 in 1 of 3 seeds") in left_out
    assert "`dense / eps-8` (codec=dense,privacy=eps-8) left out: never reached " \
        "target-accuracy 0.9 in 2 of 2 seeds" in left_out
    assert ("accuracy against epsilon: `sign / none` (codec=sign,privacy=none) is not private: "
            "drawn as a reference line") in left_out
    assert "missing column total_bytes_up_wire_est" in left_out
    time = panel_of(report, "sim_time_to_target_s")
    assert "not shown: 3 configurations that never reached the target in some seed" \
        in subtitle(time)


def test_the_wire_estimate_and_plots_with_nothing_to_draw(tmp_path: Path) -> None:
    rows = [row("dense", "none", s, 0.9, 1000, sim="", wire=1100) for s in (1, 2)]
    rows += [row("topk", "none", s, 0.8, 40, 25, sim="", wire=90) for s in (1, 2)]
    sweep = write_sweep(tmp_path, rows, FIELDS + WIRE_FIELDS)
    for stale in ("accuracy_vs_epsilon.png", "accuracy_vs_epsilon.pdf"):
        (sweep / stale).write_bytes(b"from an earlier report")
    result = write_report(sweep)
    wire = {e.config.label: e.wire for e in panel_of(result, "total_bytes_up").points}
    topk, dense = wire["codec=topk"], wire["codec=dense"]  # one axis varies: named
    assert topk is not None and dense is not None
    assert topk.mean == 90 and dense.mean == 1100 and dense.half == 0
    assert "hollow: wire estimate" in panel_of(result, "total_bytes_up").legend
    assert not (sweep / "accuracy_vs_epsilon.png").exists()
    assert not (sweep / "accuracy_vs_time.pdf").exists()
    text = result.path.read_text(encoding="utf-8")
    assert "Not drawn: no configuration is private (epsilon is empty in every seed)." in text
    assert "Not drawn: no configuration simulates devices" in text
    assert "| wire estimate |" in text
    assert ("| codec=topk,privacy=none | codec=topk | 2 | 0.8000 ± 0.0000 | 40 ± 0 | 90 ± 0 "
            "| yes | point |") in text


def test_seeds_without_the_wire_estimate_are_named(tmp_path: Path) -> None:
    """Points from before the estimate beside newer ones: payload only, and said so."""
    rows = [row("topk", "none", 1, 0.8, 40, 25, wire=90), row("topk", "none", 2, 0.8, 40, 25)]
    result = write_report(write_sweep(tmp_path, rows, FIELDS + WIRE_FIELDS))
    assert panel_of(result, "total_bytes_up").points[0].wire is None
    assert ("codec=topk,privacy=none: no wire estimate in 1 of 2 seeds"
            in result.path.read_text(encoding="utf-8"))


def test_an_old_sweep_csv_without_columns_says_what_is_missing(tmp_path: Path) -> None:
    old = [f for f in FIELDS if f not in ("compression_ratio_up", "sim_time_to_target_s")]
    sweep = write_sweep(tmp_path, ROWS, old)
    header, rows = read_table(sweep)
    configs = configurations(rows, header[:header.index("point")])
    time = build_panel(TIME, header, configs, "", "")
    assert time.not_drawn is not None and "no sim_time_to_target_s column" in time.not_drawn
    notes = build_panel(BYTES, header, configs, "", "").notes
    assert any("missing column compression_ratio_up" in n for n in notes)
    epsilon = build_panel(EPSILON, header, configs, "", "")
    assert epsilon.not_drawn is None and len(epsilon.points) == 2


def test_a_one_seed_plot_says_it_has_no_interval(tmp_path: Path) -> None:
    rows = [r for r in ROWS if r["seed"] == 1]
    sweep = write_sweep(tmp_path, rows, FIELDS)
    header, table = read_table(sweep)
    panel = build_panel(BYTES, header, configurations(table, ["codec", "privacy"]), "x", "")
    assert subtitle(panel).startswith("one seed per configuration, so no interval")
    draw(panel, "one seed", tmp_path / "one.png", {c.name: ("k", "o") for c in
                                                     (e.config for e in panel.points)})
    assert (tmp_path / "one.pdf").read_bytes()[:4] == b"%PDF"


def run_folder(path: Path, rounds: int = 3, **changes: Any) -> Path:
    config = {**DEFAULTS, **changes}
    path.mkdir(parents=True)
    results = {
        "config": config,
        "rounds": [{"round": r, "accuracy": 0.5 + 0.1 * r, "bytes_up": 100} for r in range(rounds)],
        "summary": {"final_accuracy": 0.5 + 0.1 * (rounds - 1), "total_bytes_up": 100 * rounds,
                    "epsilon": 3.0 if changes.get("privacy") else None, "delta": 1e-5}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_runs_are_overlaid_with_a_legend_of_the_keys_that_differ(tmp_path: Path) -> None:
    a = run_folder(tmp_path / "a", codec="none", seed=42, **{"out-dir": "a", "device": "cpu"})
    b = run_folder(tmp_path / "b", codec="sign", seed=43, **{"out-dir": "b", "device": "cuda"})
    older = json.loads((b / "results.json").read_text(encoding="utf-8"))
    del older["config"]["dp-clip-mode"]  # a key added since: its default, no difference
    (b / "results.json").write_text(json.dumps(older))
    result = write_comparison([a, b], tmp_path / "cmp")
    assert result.keys == ["seed", "codec"]  # in config order; out-dir, device ignored
    assert result.labels == ["seed=42, codec=none", "seed=43, codec=sign"]
    for name in ("compare.png", "compare.pdf", "compare.md"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert (tmp_path / "cmp" / "compare.pdf").read_bytes()[:4] == b"%PDF"
    table = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert f"| {b} | " in table and "| 0.7000 | 300 | — |" in table


def test_run_plots_name_codec_and_privacy_and_cli_writes_report_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private = {"codec": "sign", "privacy": "sample", "dp-target-epsilon": 8.0}
    title = run_title({**DEFAULTS, **private})
    assert title == ("cnn-tiny on digits, 20 clients, fedavg\n"
                     "codec sign, sample-level DP, target epsilon 8, delta 1e-05")
    assert "no DP" in run_title(DEFAULTS)
    run = run_folder(tmp_path / "run", **private)
    plot_rounds(json.loads((run / "results.json").read_text()), run / "accuracy.png")
    assert (run / "accuracy.pdf").read_bytes()[:4] == b"%PDF"
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run"]) == 0  # one run: the default --out is ./report
    table = (tmp_path / "report" / "compare.md").read_text(encoding="utf-8")
    assert "| 0.7000 | 300 | — | 3 (delta 1e-05) |" in table  # no wire estimate: older


def test_bad_paths_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "sweep", ROWS, FIELDS)
    run = run_folder(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a sweep folder nor a run folder; pass one "):
        sweep_folder([run, tmp_path / "empty"])
    with pytest.raises(ConfigError, match="is a sweep folder and .* a run folder"):
        sweep_folder([sweep, run])
    with pytest.raises(ConfigError, match="takes one sweep at a time"):
        sweep_folder([sweep, sweep])
    assert sweep_folder([sweep]) == sweep and sweep_folder([run]) is None
    out = tmp_path / "out"
    assert main(["report", str(sweep), str(run), "--out", str(out)]) == 2
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()
