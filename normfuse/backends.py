"""Which implementation runs: the backend registry.

Names: ``"auto"`` (default), ``"torch"`` (PyTorch ops, always there), ``"cpu"`` and ``"cuda"``
(the compiled kernels of ``normfuse._C``), ``"triton"`` (``normfuse.triton_kernels``; CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1``).

The choice comes from ``set_backend``, the ``use_backend`` context manager, or the environment
variable ``NORMFUSE_BACKEND`` read at import; all three are process-wide.  A named backend that
cannot run raises an error listing those that can: nothing falls back silently.  ``"auto"``
picks per input, in this order: CPU tensors -> ``cpu``, then ``torch``; CUDA tensors ->
``cuda``, then ``triton``, then ``torch`` (float64 on a GPU -> ``torch``, the GPU kernels are
float32/16/bf16).  While ``torch.export`` traces (``torch.compiler.is_exporting()``, also under
``torch.onnx.export``) ``"auto"`` picks ``torch``: the exported program is then standard ATen
ops, portable to ONNX and any runtime without normfuse (``normfuse/export.py``);
``torch.compile`` is not affected.
``resolve_backend(x)`` tells which one a call on ``x`` uses.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from types import SimpleNamespace

import torch

from . import torch_backend

BACKENDS = ("torch", "cpu", "cuda", "triton")


def _compiled():
    """``normfuse._extension``: loads the C++ extension and says whether it could."""
    from . import _extension  # noqa: PLC0415  (import the extension only when asked for)
    return _extension


def _triton():
    try:
        from . import triton_kernels  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001  (any import failure means "not available")
        return None, f"normfuse.triton_kernels failed to import: {exc}"
    return triton_kernels, ""


_REASONS: dict = {}


def _unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else why not (cached: it does not
    change while the process runs).  Not cached while torch.compile traces: a trace that read
    the cache would guard on its contents, and the next call, finding it filled, would compile
    the whole model again."""
    if torch.compiler.is_compiling():
        return _find_unavailable_reason(name)
    if name not in _REASONS:
        _REASONS[name] = _find_unavailable_reason(name)
    return _REASONS[name]


def _find_unavailable_reason(name: str) -> str | None:
    if name == "torch":
        return None
    if name in ("cpu", "cuda"):
        try:
            ext = _compiled()
        except Exception as exc:  # noqa: BLE001
            return f"normfuse._C is not available: {exc}"
        if name == "cpu":
            return None if ext.HAS_CPU_KERNELS else ext.REASON or "normfuse._C was not built"
        if not ext.HAS_CUDA_KERNELS:  # not built with them, or _C unusable (e.g. another torch)
            return ext.CUDA_REASON or "normfuse._C was built without CUDA kernels"
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if name == "triton":
        module, reason = _triton()
        if module is None:
            return reason
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    return f"unknown backend {name!r}"


def available_backends() -> list[str]:
    """Backends that can run on this machine, in the order ``"auto"`` prefers them."""
    return [name for name in ("cuda", "triton", "cpu", "torch") if _unavailable_reason(name) is None]


def _check_name(name: str, source: str) -> str:
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of "
                         f"{list(BACKENDS)} (available here: {available_backends()})")
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"{source}: backend {name!r} cannot run here ({reason}); "
                           f"available backends: {available_backends()}")
    return name


_state = SimpleNamespace(name=os.environ.get("NORMFUSE_BACKEND", "auto").strip() or "auto",
                         checked=False,
                         blocks=(),  # the names of the active use_backend blocks, oldest first
                         devices=None)  # compiled_devices(): (setting, answer) of the last call
# One token per active block, in the order of _state.blocks (separate: torch.compile guards on
# the names it reads, and a token read there would make every new block recompile).
_block_tokens: list = []
_blocks_lock = threading.Lock()


def _setting() -> str | None:
    """The newest active use_backend block's name (checked on entry), else None."""
    blocks = _state.blocks  # one read: another thread may replace the tuple meanwhile
    return blocks[-1] if blocks else None


def set_backend(name: str) -> None:
    """Use backend ``name`` for every following call (``"auto"`` to let normfuse choose),
    process-wide.  Active ``use_backend`` blocks still override it until they end."""
    _state.name = _check_name(name, "set_backend")
    _state.checked = True


def get_backend() -> str:
    """The backend setting (``"auto"`` or a name), not what ``"auto"`` resolves to."""
    return _setting() or _state.name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with normfuse.use_backend("torch"): ...``.  Process-wide while the
    block runs, as torch's own backend switches (``torch.nn.attention.sdpa_kernel``,
    ``torch.backends.cudnn.flags``) are, so autograd's device threads (a checkpointed forward
    recomputed in the backward) and threads the block starts use it too.  It overrides
    ``set_backend``'s choice until it ends.  Blocks entered from several threads at once: the
    newest applies, and each removes only its own setting when it ends, so once all have ended
    the setting is what ``set_backend`` made it."""
    checked = _check_name(name, "use_backend")
    token = object()
    with _blocks_lock:
        _block_tokens.append(token)
        _state.blocks = _state.blocks + (checked,)
    try:
        yield
    finally:
        with _blocks_lock:
            i = _block_tokens.index(token)
            del _block_tokens[i]
            _state.blocks = _state.blocks[:i] + _state.blocks[i + 1:]


def _auto(x: torch.Tensor) -> str:
    if torch.compiler.is_exporting():
        # torch.export (and torch.onnx.export, built on it): the PyTorch-ops backend, so the
        # exported program holds standard ATen ops only (normfuse/export.py).
        return "torch"
    # The preference order by device; which backend runs on which input is _runs_on's rule.
    for name in _AUTO_ORDER_CPU if x.is_cpu else _AUTO_ORDER_GPU:
        if _unavailable_reason(name) is None and _runs_on(name, x) and (
                name != "triton" or _triton_indexable(x)):
            return name
    return "torch"


def _triton_indexable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels' int32 indexing covers ``x`` (else ``auto`` passes them by,
    where an explicit "triton" raises naming the limits); a numel test first, so an input of
    a billion elements or fewer costs nothing more."""
    if x.numel() <= 2**30 or x.dim() < 2:
        return True
    from ._checks import is_channels_last  # noqa: PLC0415
    from .triton_kernels.runtime import int32_indexable  # noqa: PLC0415  (imported already:
    # "triton" is available, so its package was imported to say so)
    plane = math.prod(x.shape[2:])
    return int32_indexable(x.shape[0], x.shape[1], plane, plane == 1 or is_channels_last(x))


_AUTO_ORDER_CPU = ("cpu",)  # not "triton": on a CPU tensor it is the (slow) interpreter
_AUTO_ORDER_GPU = ("cuda", "triton")


def _runs_on(name: str, x: torch.Tensor) -> bool:
    """Whether the (available) backend ``name`` can run on ``x``'s device and dtype."""
    if name == "cpu":
        return x.is_cpu
    if name == "cuda":
        return x.is_cuda and x.dtype != torch.float64
    if name == "triton":
        return (x.is_cuda and x.dtype != torch.float64
                or x.is_cpu and os.environ.get("TRITON_INTERPRET") == "1")
    return True  # "torch"


def resolve_backend(x: torch.Tensor) -> str:
    """The backend that a normfuse call on input ``x`` uses under the current setting."""
    name = _setting()
    if name is None:
        name = _state.name
        if torch.compiler.is_compiling():
            # Checked in every trace, the flag not read: a trace that read it would guard on it
            # and recompile once an eager call sets it (and Dynamo cannot trace the write under
            # strict export).
            _check_name(name, "NORMFUSE_BACKEND")
        elif not _state.checked:
            _check_name(name, "NORMFUSE_BACKEND")
            _state.checked = True
    if name == "auto":
        return _auto(x)
    if name == "cpu" and x.is_cpu:
        return name
    if not _runs_on(name, x):
        raise RuntimeError(f"backend {name!r} cannot run on a {x.dtype} tensor on "
                           f"{x.device.type!r}; use backend 'auto' or 'torch' for such inputs "
                           f"(available backends: {available_backends()})")
    return name


def compiled_devices() -> int:
    """On which devices a call runs the compiled ops (``"cpu"`` / ``"cuda"``) under the current
    setting, as bits: 1 CPU inputs, 2 CUDA inputs (float64 ones excepted: "auto" sends them to
    ``torch``, a named "cuda" refuses them).  The modules' one-C-call common path
    (``normfuse._C.batch_layer_step``) runs only there; everything else takes the Python path.
    0 while the setting is an invalid ``NORMFUSE_BACKEND``: the Python path then raises, after
    the input checks, as it always did.  Cached with the setting it was computed for, so a
    concurrent ``set_backend`` can never leave a stale answer behind.  Not for tracing: callers
    test ``is_compiling`` first."""
    blocks = _state.blocks  # _setting(), inline: this runs at every module call
    name = blocks[-1] if blocks else _state.name
    cached = _state.devices
    if cached is not None and cached[0] == name:
        return cached[1]
    if not blocks and not _state.checked:
        try:
            _check_name(name, "NORMFUSE_BACKEND")
        except (ValueError, RuntimeError):
            return 0
    cpu = _unavailable_reason("cpu") is None
    cuda = _unavailable_reason("cuda") is None
    if name == "auto":
        devices = (1 if cpu else 0) | (2 if cuda else 0)
    else:
        devices = {"cpu": 1 if cpu else 0, "cuda": 2 if cuda else 0}.get(name, 0)
    _state.devices = (name, devices)  # one assignment: a reader sees a consistent pair
    return devices


def ops_for(name: str):
    """The namespace holding the twelve ops of docs/architecture.md for backend ``name``."""
    if name == "torch":
        return torch_backend
    if name in ("cpu", "cuda"):
        _compiled()
        return torch.ops.normfuse
    _triton()
    return torch.ops.normfuse_triton
