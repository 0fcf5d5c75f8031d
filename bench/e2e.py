"""End to end: one training step of a CIFAR ResNet-20 (He et al. 2016, 3 stages x 3 basic blocks,
16/32/64 channels, 1x1-conv projection shortcuts) with each normalization.

Share of the step spent in normalization (the method): the same network and step with every
normalization layer replaced by ``nn.Identity`` is timed in the same run; the normalization's
share is ``(t_step - t_identity) / t_step``.  This charges a layer everything it costs the step
(its kernels, launches, allocator traffic, its backward), which a profiler's per-op sum would
split across op names.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

from . import layers as L
from . import timing
from .shapes import num_groups_for

NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, norm: NormFactory, num_classes: int = 10, blocks: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = norm(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _group_norm(c):
    return nn.GroupNorm(num_groups_for(c), c)


def variants(backends: List[str], blocks: int = 3, layers=L.LAYERS,
             compiled: bool = False) -> List[dict]:
    """(name, layer, how the model is built, normfuse backend) for every step measured: the
    baselines, and each of ``layers`` (``python -m bench --layers``). ``compiled``
    (``--compiled-steps``): also the model under ``torch.compile`` (the baselines and the
    compiled-kernel backends' rows, unfused and fused; not the compositions), as users run it."""
    def net(norm):
        return lambda: ResNet20(norm, blocks=blocks)

    out = [dict(name="nn.BatchNorm2d", layer="batchnorm", build=net(nn.BatchNorm2d)),
           dict(name="nn.GroupNorm", layer="groupnorm", build=net(_group_norm)),
           dict(name="identity (no norm)", layer="identity", build=net(lambda c: nn.Identity()))]
    for layer in layers:
        out.append(dict(name=f"{L.LAYER_LABEL[layer]} composition", layer=layer,
                        build=net(lambda c, lay=layer: L._composition(
                            lay, c, num_groups_for(c)))))
        # ILM-Norm on the compiled-kernel backends only ("torch" when it is the only one, as
        # the fused-ReLU layer rows): its coefficient step is the same PyTorch ops on every
        # backend, and the other layers' rows show what the reference backend costs a step;
        # two ResNet-20 steps fewer a round.
        for b in backends if layer != "ilm" else L.kernel_backends(backends):
            out.append(dict(name=f"{L.LAYER_LABEL[layer]} normfuse[{b}]", layer=layer,
                            backend=b, build=lambda lay=layer: _converted(lay, blocks)))
            # The norm->ReLU pairs fused (convert(..., fuse_relu=True)): the stem's norm and
            # every block's first (1 + 3 * blocks); a block's second norm feeds the residual add.
            out.append(dict(name=f"{L.LAYER_LABEL[layer]} + ReLU fused normfuse[{b}]",
                            layer=layer, backend=b, fused_relu=True,
                            build=lambda lay=layer: _converted(lay, blocks, fuse_relu=True)))
    if compiled:
        kernels = L.kernel_backends(backends)
        out += [dict(var, name=f"{var['name']} (compiled)", compiled=True,
                     build=lambda b=var["build"]: torch.compile(b()))
                for var in list(out)
                if var["layer"] in ("batchnorm", "groupnorm", "identity") or var.get("backend") in kernels]
    return out


def _converted(layer: str, blocks: int = 3, fuse_relu: bool = False) -> nn.Module:
    """A ResNet-20 turned into ``layer`` by ``normfuse.convert`` (BatchNorm -> BIN/IEBN,
    GroupNorm -> AssocNorm/ILMNorm, the latter with convert's default key_group_size 16 and
    reduction 16, as the composition has), with its norm->ReLU pairs fused when ``fuse_relu``."""
    nf = L.normfuse()
    base = ResNet20(_group_norm if layer in L.GROUP_LAYERS else nn.BatchNorm2d, blocks=blocks)
    return nf.convert(base, layer, fuse_relu=fuse_relu)


def run_e2e(device: torch.device, backends: List[str], batch: int, target_s: float,
            min_reps: int, max_reps: int, progress, blocks: int = 3,
            layers=L.LAYERS, compiled: bool = False) -> List[dict]:
    """Median step time of every variant, all variants interleaved round by round (so the
    identity subtraction is not at the mercy of load changing between variants). A compiled
    variant compiles in its warm-up steps (not timed)."""
    torch.manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(4)]
    results, steps, contexts = [], [], []
    for var in variants(backends, blocks, layers, compiled):
        rec = dict(name=var["name"], layer=var["layer"], backend=var.get("backend"),
                   fused_relu=var.get("fused_relu", False), compiled=var.get("compiled", False),
                   batch=batch, depth=6 * blocks + 2, ok=True, median_s=None)
        try:
            steps.append(training_step(var["build"]().to(device).train(), xs, ys))
            contexts.append(backend_context(var.get("backend")))
        except Exception as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
        results.append(rec)
        progress(f"e2e built {rec['name']}" + ("" if rec["ok"] else f": {rec['error']}"))
    live = [r for r in results if r["ok"]]
    timed = timing.measure_many(steps, device, contexts=contexts, flush=False,
                                target_s=target_s, min_reps=min_reps, max_reps=max_reps,
                                warmup=2, on_round=_round_printer(len(live)))
    for rec, res, step, ctx in zip(live, timed, steps, contexts):
        rec.update(res)
        if rec["ok"]:
            with ctx():
                rec["peak_bytes"] = timing.peak_memory(lambda: step(0), device)
    norm_shares(results)
    for r in results:
        print(f"  e2e {r['name']}: " + (f"{r['median_s'] * 1e3:.3g} ms/step" if r["ok"]
                                       else r.get("error", "failed")), file=sys.stderr)
    return results


def baseline_steps(results: List[dict], layer: str) -> dict:
    """``{compiled: median_s}`` of the first timed ``layer`` step (``"identity"``, ``"batchnorm"``)
    among ``results``, eager and compiled apart: the step each variant is measured against."""
    out = {}
    for r in results:
        if r["layer"] == layer and r.get("ok"):
            out.setdefault(r.get("compiled", False), r["median_s"])
    return out


def norm_shares(results: List[dict]) -> None:
    """Each timed variant's ``norm_s`` (step time - the no-norm step's, compiled or not as the
    variant is) and ``norm_share`` (that / step time). A step below the no-norm step's time is
    noise (a busy machine, too few rounds), not a share of 0: left out (n/a in the report), and
    said so."""
    identities = baseline_steps(results, "identity")
    for r in results:
        if not r["ok"] or r["layer"] == "identity":
            continue
        ident = identities.get(r.get("compiled", False))
        if ident is None:
            continue
        if r["median_s"] >= ident:
            r["norm_s"] = r["median_s"] - ident
            r["norm_share"] = r["norm_s"] / r["median_s"]
        else:
            print(f"  e2e {r['name']}: faster than the no-norm step ({ident * 1e3:.3g} ms): its "
                  f"normalization share is n/a (timing noise; try --threads 1 or more "
                  f"repetitions)", file=sys.stderr)


def _round_printer(n):
    def show(r, rounds):
        print(f"  e2e round {r}/{rounds} ({n} variants interleaved)", file=sys.stderr,
              flush=True)
    return show


def training_step(model: nn.Module, xs, ys, autocast=contextlib.nullcontext):
    """``step(i)``: one SGD (momentum 0.9) step on the i-th input of the rotation, the forward
    and loss inside ``autocast()`` (``bench/step50.py`` passes bfloat16 autocast)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(i):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
        loss.backward()
        opt.step()
    return step


def backend_context(backend):
    if backend:
        return lambda: L.normfuse().use_backend(backend)
    return contextlib.nullcontext
