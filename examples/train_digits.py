"""Train a small CNN on scikit-learn's bundled 8x8 digits with BatchNorm, BIN, IEBN, AssocNorm and
ILMNorm.

Nothing is downloaded: the data set ships with scikit-learn.  The normfuse variants are made the
way a user would: build the usual model, ``normfuse.convert`` it, train with the helpers.

    python examples/train_digits.py [--epochs 8] [--backend auto]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import normfuse


def make_model(norm: str) -> nn.Module:
    def norm_layer(c):
        return nn.GroupNorm(4, c) if norm == "group" else nn.BatchNorm2d(c)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), norm_layer(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


VARIANTS = {  # name -> (base model's norm, normfuse.convert target or None, its options)
    "BatchNorm": ("batch", None, {}),
    "BIN": ("batch", "bin", {}),
    "IEBN": ("batch", "iebn", {}),
    "AssocNorm": ("group", "assoc", {}),
    # Key groups of 4 channels: the authors' 16 suits ResNet's 64 channels and more, and would
    # leave this model's 16-channel layer one key group (test accuracy over seeds 0-3: 97.3-97.8%
    # with 4, 90.9-98.4% with 16).
    "ILMNorm": ("group", "ilm", {"key_group_size": 4}),
}


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed,
                                                        stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train(variant: str, data, epochs: int, batch_size: int, lr: float, seed: int):
    torch.manual_seed(seed)
    base, target, options = VARIANTS[variant]
    model = make_model(base)
    if target is not None:
        model = normfuse.convert(model, target, **options)
    # BIN's gates train at 10x the learning rate, without weight decay, clipped to [0, 1].
    optimizer = torch.optim.SGD(normfuse.param_groups(model, lr, weight_decay=5e-4),
                                momentum=0.9, nesterov=True)
    normfuse.attach_gate_clipping(optimizer, model)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], epochs=epochs,
        steps_per_epoch=-(-len(data[0]) // batch_size))
    x_train, y_train, x_test, y_test = data
    step_times = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - t0)
    # the median: the first steps warm up
    return accuracy_on(model, x_test, y_test), statistics.median(step_times)


def accuracy_on(model: nn.Module, x_test, y_test) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def report(names, train_one, min_accuracy: float) -> int:
    """Train each of ``names`` (``train_one(name) -> (test accuracy, median seconds a step)``),
    a table row each as it finishes; 1 if any stays below ``min_accuracy``, else 0."""
    print(f"{'normalization':<12} {'test accuracy':>14} {'ms / step (median)':>19}")
    failed = []
    for name in names:
        accuracy, step = train_one(name)
        print(f"{name:<12} {accuracy:>14.2%} {step * 1e3:>19.2f}", flush=True)
        if accuracy < min_accuracy:
            failed.append(name)
    if failed:
        print(f"below {min_accuracy:.0%} test accuracy: {', '.join(failed)}")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--min-accuracy", type=float, default=0.90)
    args = parser.parse_args(argv)
    normfuse.set_backend(args.backend)
    data = load_data(args.seed)
    x_probe = data[0][:2]
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {args.epochs} epochs; "
          f"normfuse backend {args.backend!r} -> {normfuse.resolve_backend(x_probe)!r}")
    return report(VARIANTS, lambda variant: train(variant, data, args.epochs, args.batch_size,
                                                  args.lr, args.seed), args.min_accuracy)


if __name__ == "__main__":
    raise SystemExit(main())
