"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .layers import LAYER_LABEL, LAYERS  # noqa: E402

_STYLE = {"contiguous": "-", "channels_last": "--"}


def bandwidth(out_dir: str, kernels: List[dict], copy: List[dict]) -> List[str]:
    """Achieved bandwidth (minimum bytes / time) vs tensor size, one PNG per dtype; rows are
    directions, columns layers, the copy bandwidth at each size is the ceiling."""
    paths = []
    for dtype in sorted({r["dtype"] for r in kernels}):
        rows = [r for r in kernels if r["dtype"] == dtype and r["ok"]]
        if not rows:
            continue
        layers = [lay for lay in LAYERS if any(r["layer"] == lay for r in rows)]
        fig, axes = plt.subplots(2, len(layers), figsize=(5.2 * len(layers), 8), squeeze=False,
                                 sharex=True)
        cp = sorted((c["bytes"], c["copy_GBps"]) for c in copy if c["dtype"] == dtype)
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        colors = {name: f"C{i}" for i, name in enumerate(impls)}
        for i, direction in enumerate(("fwd", "fwd+bwd")):
            for j, layer in enumerate(layers):
                ax = axes[i][j]
                if cp:
                    ax.plot([b for b, _ in cp], [g for _, g in cp], "k-", marker="s", lw=2.5,
                            alpha=0.5, label="copy, same size (ceiling)")
                for impl in impls:
                    for fmt, ls in _STYLE.items():
                        pts = sorted((r["bytes_tensor"], r["bw_GBps"]) for r in rows
                                     if r["impl"] == impl and r["layer"] == layer
                                     and r["direction"] == direction and r["format"] == fmt)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o",
                                    ms=3, color=colors[impl],
                                    label=f"{impl} ({'NHWC' if fmt != 'contiguous' else 'NCHW'})")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{LAYER_LABEL[layer]} {direction} ({dtype})")
                ax.grid(True, which="both", alpha=0.3)
                if i == 1:
                    ax.set_xlabel("activation size (bytes)")
                if j == 0:
                    ax.set_ylabel("achieved GB/s (minimum bytes / time)")
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=8,
                   ncol=min(4, len(handles)), frameon=False)
        fig.tight_layout(rect=(0, 0.04 * (1 + len(handles) // 4), 1, 1))
        path = os.path.join(out_dir, f"bandwidth_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def step_breakdown(out_dir: str, e2e: List[dict]) -> List[str]:
    """Training-step time split into normalization and everything else (identity method)."""
    rows = [r for r in e2e if r.get("ok")]
    if not rows:
        return []
    ident = next((r["median_s"] for r in rows if r["layer"] == "identity"), None)
    names = [r["name"] for r in rows]
    total = [r["median_s"] * 1e3 for r in rows]
    rest = [min(ident * 1e3, t) if ident else t for t in total]
    norm = [t - b for t, b in zip(total, rest)]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(y, rest, color="0.7", label="rest of the step (no-norm network)")
    ax.barh(y, norm, left=rest, color="C3", label="normalization")
    for k, r in enumerate(rows):
        share = r.get("norm_share")
        if share is not None:
            ax.text(total[k], k, f" {100 * share:.0f}%", va="center", fontsize=8)
        elif r.get("layer") != "identity":  # faster than the no-norm step: noise (e2e.py)
            ax.text(total[k], k, " n/a (noise)", va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    batch, depth = rows[0].get("batch"), rows[0].get("depth", 20)
    ax.set_title(f"CIFAR ResNet-{depth} training step, batch {batch}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, "step_breakdown.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
