"""Compact models on MNIST: sparsity, precision, file size, MACs, accuracy, latency.

Each point is simulations/mnist.toml with pruning / QAT overrides, run to the end,
then exported to ONNX fp32 and int8 (onnxruntime static quantization). Latency is
per image (batch 1, one thread) in onnxruntime, as a ratio to the trained torch fp32
model measured in the same process, alternating, best of 3. Writes
benchmarks/results/compact_mnist.json.

    python benchmarks/compact_mnist.py [--rounds 100] [--points dense structured-50 ...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from smallfed.cli import load_config
from smallfed.compact.export import INPUT, OUTPUT, export_run
from smallfed.data import federated_data
from smallfed.flower.checkpoint import load
from smallfed.models import build_model
from smallfed.simulation import simulate

warnings.filterwarnings("ignore")

POINTS = {
    "dense": {},
    "structured-50 + QAT": {"prune": "structured", "prune-sparsity": 0.5,
                            "prune-end-round": 50, "qat-rounds": 10},
    "structured-70 + QAT": {"prune": "structured", "prune-sparsity": 0.7,
                            "prune-end-round": 50, "qat-rounds": 10},
    "unstructured-80": {"prune": "unstructured", "prune-sparsity": 0.8,
                        "prune-end-round": 50},
    "shared-16": {"share-weights": 16, "share-rounds": 10},
    "shared-4": {"share-weights": 4, "share-rounds": 10},
    "cnn-shared": {"model": "cnn-shared"},
}


def latency_ratio(run: Path, onnx_file: Path, images: np.ndarray) -> tuple[float, float]:
    """(onnxruntime seconds per image, its ratio to torch fp32), batch 1, one thread."""
    ckpt = load(run)
    cfg = load_config(None, []).from_mapping(ckpt.config)
    dataset = federated_data(cfg).dataset
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.global_arrays.items()})
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    normalised = torch.from_numpy((images - dataset.pixel_mean) / dataset.pixel_std)
    torch.set_num_threads(1)
    onnx_s, torch_s = [], []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(len(images)):
            session.run([OUTPUT], {INPUT: images[i:i + 1]})
        onnx_s.append((time.perf_counter() - start) / len(images))
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(len(images)):
                model(normalised[i:i + 1])
        torch_s.append((time.perf_counter() - start) / len(images))
    return min(onnx_s), min(onnx_s) / min(torch_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--runs", default="benchmarks/results/compact-runs")
    args = parser.parse_args()
    out_file = Path("benchmarks/results/compact_mnist.json")
    rows = json.loads(out_file.read_text())["points"] if out_file.is_file() else {}
    for label in args.points:
        cfg = load_config(args.config, []).replace(num_server_rounds=args.rounds)
        cfg = cfg.from_mapping({**cfg.to_dict(), **POINTS[label]})
        run = Path(args.runs) / label.replace(" ", "").replace("+", "_")
        results = simulate(cfg, run, progress=False, overwrite=True)
        dataset = federated_data(cfg).dataset
        images = (dataset.test_x[:500] * dataset.pixel_std + dataset.pixel_mean).numpy()
        row = {"rounds": args.rounds, "overrides": POINTS[label],
               "total_bytes_up": results["summary"]["total_bytes_up"],
               "compression_ratio_up": results["summary"]["compression_ratio_up"],
               "wall_time_s": results["summary"]["wall_time_s"]}
        for precision in ("fp32", "int8"):
            file = run / f"model.{precision}.onnx"
            report = export_run(run, file, int8=precision == "int8")
            seconds, ratio = latency_ratio(run, file, images)
            row[precision] = {**asdict(report), "latency_s": seconds, "latency_vs_torch": ratio}
            print(f"{label:22} {precision}: {report.file_bytes:>8,} B, {report.nonzero_params:>7,}"
                  f" nonzero, {report.macs:>9,} MACs, acc {report.onnx_accuracy:.4f} (torch "
                  f"{report.torch_accuracy:.4f}), latency {seconds * 1e6:.0f} us = {ratio:.2f}x")
        rows[label] = row
        out_file.write_text(json.dumps({"points": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
