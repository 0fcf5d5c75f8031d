"""The bench's comparisons as pytest-benchmark groups: ``pytest bench --benchmark-only``.

One small real-network shape per device (CIFAR ResNet stage 1), every layer x direction x layout;
in each group the contenders are the normfuse backends for the device, the native layer and the
composition (and ``torch.compile`` of the composition when ``NORMFUSE_BENCH_COMPILE=1``), plus
``floor``: plain copies that move exactly the minimum bytes (forward ``y.copy_(x)``; backward
adds ``torch.add(x, dy, out=dx)``), the bandwidth floor as an op.
Inputs rotate through a pool, as in ``python -m bench``; on a GPU every call synchronizes.

``test_host``: the host-cost group (``bench/host.py``) on every machine: one layer step
(forward + backward) on a tiny (2, 8, 4, 4) float32 CPU input, one thread, for
``nn.BatchNorm2d``, ``nn.GroupNorm`` and BIN, IEBN, AssocNorm, ILMNorm on the ``cpu`` backend.

``test_transforms``: ``bench/transforms.py`` (``grad``, per-sample gradients, MAML's step under
``torch.func``) on a (32, 64, 8, 8) float32 CPU input, one thread, a group per transform.

``test_heads``: ``bench/heads.py`` (BIN and IEBN on a 2-d (1024, 256) float32 CPU input against
``nn.BatchNorm1d``), one thread, a group per mode (training step, eval forward).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from bench import heads as HD
from bench import host as H
from bench import transforms as T
from bench import layers as L
from bench import suite, timing
from bench.shapes import cifar, num_groups_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = cifar(128 if DEVICE == "cuda" else 32, stages=(1,))[0]
IMPLS = {layer: L.impls_for(L.backends_for(DEVICE), layer,
                            os.environ.get("NORMFUSE_BENCH_COMPILE") == "1")
         for layer in L.LAYERS}
CASES = [(layer, d, fmt, impl) for layer in L.LAYERS
         for d, fmt in itertools.product(suite.DIRECTIONS, suite.FORMATS)
         for impl in IMPLS[layer]]


@pytest.mark.parametrize("layer,direction,fmt,impl", CASES,
                         ids=[f"{lay}-{d}-{f}-{i.name}" for lay, d, f, i in CASES])
def test_layer(benchmark, layer, direction, fmt, impl):
    dev = torch.device(DEVICE)
    c, g = SHAPE.channels, num_groups_for(SHAPE.channels)
    nbytes = SHAPE.numel * 4
    xs, dys = suite._inputs(SHAPE, torch.float32, fmt, dev, timing.pool_size(2 * nbytes, dev), 0)
    try:
        mod = L.build(impl, layer, c, g, L.reference(layer, c, g), dev)
        mod, _ = L.fit_dtype(mod, impl, xs[0])
    except Exception as exc:  # e.g. torch.compile not working here
        pytest.skip(f"{impl.name} does not run: {type(exc).__name__}: {exc}")
    run = suite._runner(mod, impl, direction, xs, dys)
    counter = itertools.count()

    def call():
        run(next(counter))
        timing.synchronize(dev)

    benchmark.group = f"{L.LAYER_LABEL[layer]} {direction} {SHAPE} float32 {fmt}"
    benchmark.extra_info.update(min_bytes=suite.MIN_PASSES[direction] * nbytes,
                                model_bytes=suite.MODEL_PASSES[direction] * nbytes)
    with impl.context():
        benchmark(call)


@pytest.mark.parametrize("layer,direction,fmt", [
    (layer, d, fmt) for layer in L.LAYERS
    for d, fmt in itertools.product(suite.DIRECTIONS, suite.FORMATS)])
def test_floor(benchmark, layer, direction, fmt):
    dev = torch.device(DEVICE)
    nbytes = SHAPE.numel * 4
    xs, dys = suite._inputs(SHAPE, torch.float32, fmt, dev, timing.pool_size(2 * nbytes, dev), 0)
    y, dx = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    counter = itertools.count()

    def call():
        i = next(counter) % len(xs)
        y.copy_(xs[i])
        if direction != "fwd":
            torch.add(xs[i], dys[i], out=dx)
        timing.synchronize(dev)

    benchmark.group = f"{L.LAYER_LABEL[layer]} {direction} {SHAPE} float32 {fmt}"
    benchmark.extra_info.update(min_bytes=suite.MIN_PASSES[direction] * nbytes)
    benchmark(call)


HOST = H.contenders(["cpu"] if L.normfuse() is not None
                    and "cpu" in L.normfuse().available_backends() else [])


@pytest.mark.parametrize("spec", HOST, ids=[s["name"] for s in HOST])
def test_host(benchmark, spec):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        step = H.make_step(spec["build"]().train())
        benchmark.group = (f"host cost: layer step {'x'.join(map(str, H.SHAPE))} float32 cpu, "
                           "1 thread")
        benchmark.extra_info.update(H.count_ops(step, H.context(spec)))
        with H.context(spec)():
            benchmark(step)
    finally:
        torch.set_num_threads(previous)


TRANSFORM_SHAPE = (32, 64, 8, 8)
TRANSFORM_CASES = [(t, s) for t in T.TRANSFORMS for s in T.contenders(
    TRANSFORM_SHAPE[1], ["cpu"] if L.normfuse() is not None
    and "cpu" in L.normfuse().available_backends() else [])]


@pytest.mark.parametrize("transform,spec", TRANSFORM_CASES,
                         ids=[f"{t}-{s['name']}" for t, s in TRANSFORM_CASES])
def test_transforms(benchmark, transform, spec):
    """``bench/transforms.py``'s calls as groups, one per transform: ``grad``, per-sample
    gradients, MAML's step, each layer against ``nn.BatchNorm2d`` / ``nn.GroupNorm``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(*TRANSFORM_SHAPE) + 0.5
        call = T.make_call(spec["build"](), transform, x)
        benchmark.group = (f"torch.func {transform}: {'x'.join(map(str, TRANSFORM_SHAPE))} "
                           "float32 cpu, 1 thread")
        with H.context(spec)():
            benchmark(call, 0)
    finally:
        torch.set_num_threads(previous)


HEAD_SHAPE = (1024, 256)
HEAD_CASES = [(m, s) for m in HD.MODES for s in HD.contenders(
    HEAD_SHAPE[1], ["cpu"] if L.normfuse() is not None
    and "cpu" in L.normfuse().available_backends() else [])]


@pytest.mark.parametrize("mode,spec", HEAD_CASES, ids=[f"{m}-{s['name']}" for m, s in HEAD_CASES])
def test_heads(benchmark, mode, spec):
    """``bench/heads.py``'s calls as groups, one per mode: BIN and IEBN on a 2-d head input
    against ``nn.BatchNorm1d``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = (torch.randn(*HEAD_SHAPE) + 0.5).requires_grad_()
        call = HD.make_call(spec["build"](), mode, x, compiled=False)
        benchmark.group = f"2-d heads {mode}: {'x'.join(map(str, HEAD_SHAPE))} float32 cpu, 1 thread"
        with H.context(spec)():
            benchmark(call, 0)
    finally:
        torch.set_num_threads(previous)
