"""What normfuse can do on this machine, and why not where it cannot: ``python -m normfuse``.

``info()`` returns it as a dict (``report()`` as text): the versions (normfuse; the torch running
and the torch normfuse._C was built against, which must be the same; triton), what the build
holds (CUDA kernels, target architectures), the visible GPUs, every backend as available or
with the reason it is not (the same reasons the errors give), the backend setting and which
backend it runs for a float32 tensor on the CPU and on the GPU (``resolve_backend``), and the CUDA kernels' run-time path
switches (fused layer steps, single read). Nothing is chosen silently: this is where a user sees
what was chosen. It never raises for a missing piece: each entry says what it could not find.
"""
from __future__ import annotations

import platform
import sys

import torch

from . import backends


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001  (absent or broken: reported as not installed)
        return None
    return getattr(module, "__version__", "unknown")


def _build() -> dict:
    try:
        from . import _build_info
    except ImportError:
        return {"built": False}
    # getattr: a _build_info.py from an older setup.py may lack a field
    return {"built": True, "torch": str(getattr(_build_info, "TORCH_VERSION", "unknown")),
            "with_cuda": bool(getattr(_build_info, "WITH_CUDA", False)),
            "cuda_arch_list": getattr(_build_info, "CUDA_ARCH_LIST", None)}


def _gpus() -> list:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            p = torch.cuda.get_device_properties(i)
        except Exception as exc:  # noqa: BLE001  (a visible GPU that does not initialise)
            out.append({"index": i, "error": f"{type(exc).__name__}: {exc}"})
            continue
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
    return out


def _resolved() -> dict:
    picks = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:  # torch.empty too: a GPU torch sees may still fail to initialise
            picks[device] = backends.resolve_backend(torch.empty(0, device=device))
        except (RuntimeError, ValueError) as exc:  # e.g. an invalid NORMFUSE_BACKEND
            picks[device] = f"error: {exc}"
    return picks


def _cuda_paths() -> dict:
    from . import _extension
    c = _extension._C
    return {name: getattr(c, name)() for name in ("fused_steps", "single_read")
            if c is not None and hasattr(c, name)}


def info() -> dict:
    """Everything ``python -m normfuse`` prints, as a dict."""
    from . import __version__, _extension
    return {
        "normfuse": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _module_version("triton"),
        "build": _build(),
        "extension": "ok" if _extension.HAS_CPU_KERNELS else _extension.REASON,
        "cuda_kernels": "ok" if _extension.HAS_CUDA_KERNELS else _extension.CUDA_REASON,
        "gpus": _gpus(),
        "backends": {name: backends._unavailable_reason(name) or "available"
                     for name in ("cuda", "triton", "cpu", "torch")},
        "backend_setting": backends.get_backend(),
        "resolved": _resolved(),
        "cuda_paths": _cuda_paths(),
    }


def report(data: dict | None = None) -> str:
    """``info()`` as the lines ``python -m normfuse`` prints."""
    d = info() if data is None else data
    b = d["build"]
    lines = [
        f"normfuse {d['normfuse']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})"
        f"  triton {d['triton'] or 'not installed'}",
        (("normfuse._C: built against torch " if d["extension"] == "ok" else
          # the record alone (a source tree a build wrote it into, or _C for another torch)
          "normfuse._C: not loaded (below); normfuse/_build_info.py says built against torch ")
         + b["torch"]
         + (f", CUDA kernels for {b['cuda_arch_list'] or 'the build machine GPU (TORCH_CUDA_ARCH_LIST unset)'}"
            if b["with_cuda"] else ", CPU kernels only"))
        if b["built"] else
        ("normfuse._C: loaded, without its build record (normfuse/_build_info.py, written by "
         "setup.py; the extension was copied without it?): the torch and CUDA architectures it "
         "was built for are unknown")
        if d["extension"] == "ok" else
        "normfuse._C: not built (python setup.py build_ext --inplace, or pip install "
        "--no-build-isolation -e .)",
        f"  extension: {d['extension']}",
        f"  CUDA kernels: {d['cuda_kernels']}",
        "GPUs: " + ("; ".join(f"{g['index']}: {g['error']}" if "error" in g else
                              f"{g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, "
                              f"{g['memory_gib']} GiB, {g['sms']} SMs)" for g in d["gpus"])
                    or "none visible"),
        "backends:",
    ]
    lines += [f"  {name:7s} {state}" for name, state in d["backends"].items()]
    lines.append(f"backend setting {d['backend_setting']!r}: a float32 call runs "
                 + ", ".join(f"{pick!r} on {dev}" for dev, pick in d["resolved"].items()))
    if d["cuda_paths"]:
        lines.append("CUDA paths: " + ", ".join(f"{k} = {v!r}" for k, v in d["cuda_paths"].items()))
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
