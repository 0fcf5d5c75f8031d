"""Differentially private training (DP-SGD) of a small CNN on scikit-learn's 8x8 digits, with
GroupNorm and with AssocNorm, per-sample gradients from ``torch.func``.

DP-SGD clips each sample's gradient and adds Gaussian noise to their sum, so it needs every
sample's own gradient: ``vmap(grad(loss))`` over the batch. Batch norm mixes the samples of a
batch (a sample's "gradient" would depend on the others), hence GroupNorm-style layers in private
training, and AssocNorm here: ``normfuse.convert(model, "assoc")`` on the GroupNorm model. The
script checks one batch's per-sample gradients against a loop of single-sample gradients, then
trains each variant and reports test accuracy and time per step.

    python examples/dp_sgd_digits.py [--epochs 30] [--noise 0.3] [--clip 1.0]

No privacy accounting here (which epsilon a run spends): use a library such as Opacus for that.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import normfuse
from train_digits import accuracy_on, load_data, report  # this script's directory


def make_model(assoc: bool) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return normfuse.convert(model, "assoc") if assoc else model


def per_sample_gradients(model: nn.Module):
    """``f(params, x, y)``: each sample's gradient of its own loss, stacked on dim 0."""
    def loss(params, xi, yi):
        logits = functional_call(model, params, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))
    return vmap(grad(loss), in_dims=(None, 0, 0))


def check_against_a_loop(model: nn.Module, x, y) -> float:
    """Largest difference between the vmapped per-sample gradients and a loop of autograd."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    batched = per_sample_gradients(model)(params, x, y)
    worst = 0.0
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for (name, _), g in zip(model.named_parameters(),
                                torch.autograd.grad(loss, list(model.parameters()))):
            worst = max(worst, (batched[name][i] - g).abs().max().item())
    return worst


def train(assoc: bool, data, epochs: int, batch_size: int, lr: float, clip: float, noise: float,
          seed: int):
    torch.manual_seed(seed)
    model = make_model(assoc)
    per_sample = per_sample_gradients(model)
    x_train, y_train, x_test, y_test = data
    step_times = []
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            params = {k: v.detach() for k, v in model.named_parameters()}
            grads = per_sample(params, x_train[idx], y_train[idx])
            # clip each sample's whole gradient to norm <= clip, sum, add noise, average
            norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    g = torch.einsum("b,b...->...", factor, grads[name])
                    g += noise * clip * torch.randn_like(g)
                    p -= lr * g / batch_size
            step_times.append(time.perf_counter() - t0)
    return accuracy_on(model, x_test, y_test), statistics.median(step_times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.85)
    args = parser.parse_args(argv)
    data = load_data(args.seed)
    torch.manual_seed(args.seed)
    worst = check_against_a_loop(make_model(True), data[0][:8], data[1][:8])
    print(f"AssocNorm per-sample gradients vs a loop of single-sample autograd: max |diff| "
          f"{worst:.1e}")
    if worst > 1e-4:
        return 1
    print(f"DP-SGD, {args.epochs} epochs, batch {args.batch_size}, clip {args.clip}, noise "
          f"multiplier {args.noise}; normfuse backend {normfuse.resolve_backend(data[0][:2])!r}")
    assoc = {"GroupNorm": False, "AssocNorm": True}
    return report(assoc, lambda name: train(assoc[name], data, args.epochs, args.batch_size,
                                            args.lr, args.clip, args.noise, args.seed),
                  args.min_accuracy)


if __name__ == "__main__":
    raise SystemExit(main())
