"""Upload compression against accuracy on MNIST, and what the codec costs in time.

Runs simulations/mnist.toml once per codec (the dense run first, as the baseline),
all with the same seed and rounds, two at a time, and writes a table of upload bytes
per client per round, ratio to dense fp32, final accuracy and its change against the
baseline. Then times encode + decode against one client's local training, and the
codec's throughput on a 1,000,000-parameter update.

    python benchmarks/codec_mnist.py [--rounds 100] [--workers 2] [--codecs ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from smallfed.cli import load_config
from smallfed.codec import parse_codec
from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.simulation import simulate
from smallfed.training import CLIENT_THREADS, client_generator, torch_threads, train

CODECS = [
    "none",
    "fp16",
    "quantize:4,error_feedback",
    "topk:0.01,quantize:4,error_feedback",
    "topk:0.005,quantize:2,error_feedback",
    "topk:0.002,quantize:2,error_feedback",
    "randk:0.01,fp16,error_feedback",
    "topk:0.01,sign,error_feedback",
]
RESULTS = Path("benchmarks/results")


def run_one(args: tuple[dict, str]) -> tuple[str, dict]:
    values, codec = args
    cfg = Config.from_mapping({**values, "codec": codec})
    with TemporaryDirectory() as out:
        results = simulate(cfg, out, progress=False)
    return codec, results


def codec_cost(cfg: Config, codec: str) -> dict:
    """Encode+decode seconds of one real client update, against that client's training."""
    fed = federated_data(cfg)
    ds = fed.dataset
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, cfg.seed)
    start = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    x, y = fed.client(0)
    with torch_threads(CLIENT_THREADS):  # warm-up: first calls load lazy torch modules
        train(build_model(cfg.model, ds.input_shape, ds.num_classes, 0), x, y, cfg,
              client_generator(cfg.seed, 0, 0))
    t0 = time.perf_counter()
    with torch_threads(CLIENT_THREADS):
        train(model, x, y, cfg, client_generator(cfg.seed, 1, 0))
    train_s = time.perf_counter() - t0
    delta = {k: v.numpy() - start[k] for k, v in model.state_dict().items()}
    chain = parse_codec(codec)
    template = {k: v.shape for k, v in delta.items()}
    repeats = 20
    t0 = time.perf_counter()
    for i in range(repeats):
        payload, _ = chain.encode(delta, seed=i)
        chain.decode(payload, template)
    codec_s = (time.perf_counter() - t0) / repeats
    big = {"w": np.random.default_rng(0).normal(size=(1000, 1000)).astype(np.float32)}
    t0 = time.perf_counter()
    for i in range(5):
        payload, _ = chain.encode(big, seed=i)
    encode_s = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    for _ in range(5):
        chain.decode(payload, {"w": (1000, 1000)})
    decode_s = (time.perf_counter() - t0) / 5
    return {"codec_s_per_update": codec_s, "local_train_s": train_s,
            "codec_share_of_training": codec_s / train_s,
            "encode_mb_per_s_1m": 4.0 / encode_s, "decode_mb_per_s_1m": 4.0 / decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--out", help="default benchmarks/results/codec_mnist_r<rounds>.json")
    args = parser.parse_args()
    cfg = load_config(args.config, []).replace(num_server_rounds=args.rounds)
    jobs = [(cfg.to_dict(), codec) for codec in args.codecs]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = dict(pool.map(run_one, jobs))
    base = runs[args.codecs[0]]
    rows = []
    for codec in args.codecs:
        s, rounds = runs[codec]["summary"], runs[codec]["rounds"]
        updates = sum(r["clients"] for r in rounds)
        accuracy = [r["accuracy"] for r in rounds]
        rows.append({
            "codec": codec,
            "bytes_per_update": round(s["total_bytes_up"] / updates, 1),
            "ratio_up": s["compression_ratio_up"],
            "final_accuracy": s["final_accuracy"],
            "change_points": round(100 * (s["final_accuracy"] - base["summary"]["final_accuracy"]), 2),
            # One round's accuracy moves by half a point; the last 10 rounds' mean does not.
            "mean_last10": float(np.mean(accuracy[-10:])),
            "change_last10_points": round(100 * (np.mean(accuracy[-10:]) - np.mean(
                [r["accuracy"] for r in base["rounds"]][-10:])), 2),
            "rounds_to_97": next((i for i, a in enumerate(accuracy) if a >= 0.97), None),
            **codec_cost(cfg, codec),
        })
    print(f"{'codec':42} {'B/update':>9} {'ratio':>7} {'final':>7} {'change':>7} {'last10':>7}"
          f" {'change':>7} {'r>=97%':>6} {'codec/train':>11} {'enc MB/s':>9} {'dec MB/s':>9}")
    for r in rows:
        print(f"{r['codec']:42} {r['bytes_per_update']:9.0f} {r['ratio_up']:7.1f} "
              f"{r['final_accuracy']:7.4f} {r['change_points']:+7.2f} {r['mean_last10']:7.4f} "
              f"{r['change_last10_points']:+7.2f} {str(r['rounds_to_97']):>6} "
              f"{100 * r['codec_share_of_training']:10.2f}% {r['encode_mb_per_s_1m']:9.0f} "
              f"{r['decode_mb_per_s_1m']:9.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"codec_mnist_r{args.rounds}.json"
    out.write_text(json.dumps(
        {"config": cfg.to_dict(), "rows": rows,
         "accuracy_per_round": {c: [r["accuracy"] for r in runs[c]["rounds"]] for c in runs}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
