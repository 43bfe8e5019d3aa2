"""DP-friendly models under central DP-SGD: cnn-tiny against scatter-linear, scatter-cnn
and cnn-tiny-tanh at one small budget, and the scattering against kymatio.

Central (not federated) DP-SGD with Opacus's ``make_private_with_epsilon`` on the MNIST
pool smallfed uses (``--data-dir``: the 8,000 pool images of the 10,000 MNIST test
images; the other 2,000 are the held-out test set): Poisson sampling at an expected
batch of ``--batch``, ``--epochs`` epochs, the noise Opacus finds for ``--epsilon`` at
delta 1e-5 (RDP accountant), clip ``--clip``, SGD with momentum 0.9. Every model gets the
same recipe, untuned: one learning rate by default. With several ``--lrs`` each model's
own is picked on a validation split of the pool (the last ``--val`` pool images; the
privacy of that pick is not accounted, as is usual) and the model then trained on the
whole pool with a fresh seed; that doubles the time, more than the 10-minute budget of
the recorded run allowed on its 2 CPU cores.

The scattering front end has no parameters and is fixed, so training ``model`` on
images is the same computation as training ``model[1:]`` on ``model[0](images)``,
which is what is done here (the features are computed once, not every epoch).

    python benchmarks/dp_models.py [--data-dir ../shared/data/mnist] [--epsilon 3]

Writes benchmarks/results/dp_models.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smallfed.data.datasets import load_mnist
from smallfed.models import build_model, macs, model_report
from smallfed.models.scatter import Scattering2D

warnings.filterwarnings("ignore")
MODELS = ("cnn-tiny", "cnn-tiny-tanh", "scatter-linear", "scatter-cnn")
DELTA = 1e-5


def features(front: nn.Module | None, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    if front is None:
        return x
    with torch.no_grad():
        return torch.cat([front(x[i:i + batch]) for i in range(0, len(x), batch)])


def train_dp(head: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
             lr: float, seed: int) -> tuple[nn.Module, float, float]:
    """DP-SGD (Opacus make_private_with_epsilon); (the trained module, epsilon, noise)."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private_with_epsilon(
        module=head, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=DELTA, epochs=args.epochs, max_grad_norm=args.clip)
    module.train()
    for _ in range(args.epochs):
        for xb, yb in loader:
            if len(yb) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(xb), yb).backward()
            optimizer.step()
    epsilon = engine.get_epsilon(DELTA)
    trained = module._module
    module.remove_hooks()
    return trained, epsilon, optimizer.noise_multiplier


def accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head.eval()(x).argmax(1) == y).float().mean())


def kymatio_check() -> dict:
    """The fixed-convolution scattering against kymatio's, per truncation ``tail``."""
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError:
        return {"skipped": "kymatio is not installed"}
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:32], dtype=torch.float32)[:, None] / 16
    rows = {}
    for size in (28, 8):
        J = 2 if size >= 16 else 1
        images = digits if size == 8 else F.interpolate(digits, size=(size, size),
                                                        mode="bilinear")
        noise = torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(0))
        x = torch.cat([images, noise])
        reference = ScatteringTorch2D(J=J, shape=(size, size), L=8)(x)
        for tail in (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            front = Scattering2D((1, size, size), tail=tail)
            ours = front(x)
            theirs = reference.reshape(ours.shape)
            rows[f"{size}x{size} tail={tail:g}"] = {
                "max_abs_diff_over_max_abs": float((ours - theirs).abs().max()
                                                   / theirs.abs().max()),
                "fixed_macs": front.fixed_macs,
            }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lrs", default="0.5")
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/dp_models.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    data = load_mnist(args.data_dir)
    shape = tuple(data.train_x.shape[1:])
    lrs = [float(v) for v in args.lrs.split(",")]
    results, cache = {}, {}
    for name in args.models.split(","):
        model = build_model(name, shape, data.num_classes, args.seed)
        front = model[0] if isinstance(model[0], Scattering2D) else None
        t0 = time.perf_counter()
        key = None if front is None else front.extra_repr()  # same transform, same features
        if key not in cache:
            cache[key] = features(front, data.train_x), features(front, data.test_x)
        train_x, test_x = cache[key]
        feature_s = time.perf_counter() - t0
        fit_x, fit_y = train_x[:-args.val], data.train_y[:-args.val]
        val_x, val_y = train_x[-args.val:], data.train_y[-args.val:]
        picks = {}
        for lr in lrs if len(lrs) > 1 else []:
            head = build_model(name, shape, data.num_classes, args.seed)
            head = head[1:] if front is not None else head
            trained, _, _ = train_dp(head, fit_x, fit_y, args, lr, args.seed)
            picks[lr] = accuracy(trained, val_x, val_y)
        lr = max(picks, key=picks.get) if picks else lrs[0]
        head = build_model(name, shape, data.num_classes, args.seed + 1)
        head = head[1:] if front is not None else head
        t0 = time.perf_counter()
        trained, epsilon, noise = train_dp(head, train_x, data.train_y, args, lr, args.seed + 1)
        train_s = time.perf_counter() - t0
        results[name] = {
            "test_accuracy": accuracy(trained, test_x, data.test_y),
            "lr": lr, "validation_accuracy_per_lr": {str(k): v for k, v in picks.items()},
            "epsilon": epsilon, "noise_multiplier": noise,
            "params": model_report(model).params, "macs": macs(model, shape),
            "fixed_macs": front.fixed_macs if front is not None else 0,
            "feature_s": round(feature_s, 1), "train_s": round(train_s, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "setup": {"data": "MNIST pool (8,000 of the test images) / held-out 2,000",
                  "train_images": len(data.train_y), "test_images": len(data.test_y),
                  "epsilon": args.epsilon, "delta": DELTA, "accountant": "rdp",
                  "epochs": args.epochs, "expected_batch": args.batch, "clip": args.clip,
                  "optimizer": "sgd momentum 0.9", "lrs_tried": lrs,
                  "lr_pick": f"validation on the last {args.val} pool images"
                  if len(lrs) > 1 else "one lr for all, untuned",
                  "threads": torch.get_num_threads()},
        "models": results,
        "scattering_vs_kymatio": kymatio_check(),
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["scattering_vs_kymatio"], indent=1))


if __name__ == "__main__":
    main()
