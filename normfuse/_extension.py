"""Loads the compiled ops (``normfuse._C``, built from ``csrc/``) and registers fake (meta)
implementations for every op of the ``normfuse`` namespace, so ``torch.compile`` / FakeTensor
tracing sees shapes, dtypes and strides without running a kernel.

``HAS_CPU_KERNELS``: ``torch.ops.normfuse.*`` have CPU kernels (the extension imported).
``HAS_CUDA_KERNELS``: the CUDA kernels were compiled in (says nothing about a GPU being visible).
``REASON``: why the extension is unusable ('' if it imported); ``CUDA_REASON`` likewise for CUDA.
An extension built against another torch than the running one is not loaded (a RuntimeWarning
and ``REASON`` say so).
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import sys
import warnings
from pathlib import Path

import torch

from . import _inductor_layouts

OP_NAMES = (
    "moments",
    "affine_apply",
    "backward_sums",
    "backward_apply",
    "bin_coefficients",
    "bin_coefficients_backward",
    "iebn_coefficients",
    "iebn_coefficients_backward",
    "assoc_coefficients",
    "assoc_coefficients_backward",
    "ilm_coefficients",
    "ilm_coefficients_backward",
    # the BIN / IEBN layer steps the whole-layer ops call (csrc/common/layer_compositions.h)
    "bin_moments_coefficients",
    "iebn_moments_coefficients",
    "bin_sums_coefficients_backward",
    "iebn_sums_coefficients_backward",
    # a BIN / IEBN layer's whole direction: the layer step then the full-size op (same file)
    "bin_layer_forward",
    "iebn_layer_forward",
    "bin_layer_backward",
    "iebn_layer_backward",
    # an AssocNorm / ILM-Norm layer's whole direction: moments -> coefficients -> affine_apply and
    # backward_sums -> coefficients backward -> backward_apply (csrc/common/layer_compositions.h)
    "assoc_layer_forward",
    "ilm_layer_forward",
    "assoc_layer_backward",
    "ilm_layer_backward",
    # IEBN with one value per plane, CPU only (csrc/cpu/iebn_pointwise_cpu.cpp): what iebn_layer
    # runs for a 2-d input on the CPU
    "iebn_pointwise_apply",
    "iebn_pointwise_backward",
)

HAS_CPU_KERNELS = False
HAS_CUDA_KERNELS = False
REASON = ""
CUDA_REASON = ""


def _built_for_other_torch() -> str:
    """Why ``_C`` must not be loaded because it was compiled against another torch, or ''.

    A C++ extension works only with the torch it was compiled against; loaded under another it
    fails with an undefined symbol at best.  setup.py records that torch in ``_build_info``."""
    try:
        from . import _build_info  # noqa: PLC0415
    except ImportError:  # built before _build_info existed, or not built: let the import tell
        return ""
    if _build_info.TORCH_VERSION == torch.__version__:
        return ""
    return (f"normfuse._C was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is running; rebuild normfuse for this torch "
            "(`pip install --no-build-isolation -e .` in a checkout, else `pip install "
            "--no-build-isolation --no-cache-dir --force-reinstall --no-deps normfuse`, or a "
            "wheel built against it)")


def _shadowed_install(here: Path) -> str:
    """The directory of another normfuse with a compiled ``_C`` on ``sys.path`` (one other than
    ``here``, this package's directory, which was found first), or ''.

    Run from a checkout or an unpacked sdist after a non-editable install, ``import normfuse``
    finds the source tree's normfuse/ first (the current directory leads ``sys.path``), which
    has no ``_C``: the installed one is then the one to point at, not a missing build."""
    here = here.resolve()
    for entry in sys.path:
        pkg = Path(entry or ".") / "normfuse"
        try:
            if pkg.resolve() == here:
                continue
            if any((pkg / f"_C{suffix}").is_file()
                   for suffix in importlib.machinery.EXTENSION_SUFFIXES):
                return str(pkg)
        except OSError:
            continue
    return ""


REASON = _built_for_other_torch()
if REASON:
    _C = None
    CUDA_REASON = REASON
    # The compiled backends are then unavailable: say so once, at import, rather than leave
    # "auto" to pick the torch backend without a word (set_backend("cpu") raises with REASON).
    warnings.warn(REASON, RuntimeWarning, stacklevel=2)
else:
    try:  # importing runs the TORCH_LIBRARY registrations. (import_module: during `import
        # normfuse` a missing _C would read "cannot import name '_C' from partially initialized
        # module 'normfuse' (most likely due to a circular import)" through `from . import`.)
        _C = importlib.import_module("normfuse._C")
    except Exception as exc:  # noqa: BLE001  (not built, undefined symbols, ABI mismatch...)
        _C = None
        what = (f"is not built ({exc})" if isinstance(exc, ModuleNotFoundError)
                else f"failed to import ({type(exc).__name__}: {exc})")
        _shadowed = (_shadowed_install(Path(__file__).parent)
                     if isinstance(exc, ModuleNotFoundError) else "")
        if _shadowed:
            REASON = (f"normfuse._C {what}: this normfuse is {Path(__file__).parent}, a source "
                      f"tree ahead of the installed {_shadowed} on sys.path (the current "
                      "directory comes first); run from another directory, or install in place "
                      "(`pip install --no-build-isolation -e .`)")
        else:
            REASON = (f"normfuse._C {what}; build it with "
                      "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`")
        CUDA_REASON = REASON
if _C is not None:
    HAS_CPU_KERNELS = True
    HAS_CUDA_KERNELS = bool(_C.has_cuda())
    if not HAS_CUDA_KERNELS:
        try:  # the build says why (builds before it said nothing)
            from ._build_info import WITHOUT_CUDA_WHY as _without_cuda_why  # noqa: PLC0415
        except ImportError:
            _without_cuda_why = "no toolkit found, or NORMFUSE_CPU_ONLY=1"
        CUDA_REASON = f"normfuse._C was built without CUDA kernels ({_without_cuda_why})"

# ---- fake implementations -------------------------------------------------------------------------
# Shapes follow docs/architecture.md: statistics and coefficients are (N, C) in the dtype of the
# statistics passed in (the acc dtype); full-size outputs copy the input's strides; parameter
# gradients take the parameter's shape, (C,) when the parameter is None.

def _same_device(op, first, **tensors):
    """The compiled kernels' device checks, for the fake kernels: every tensor argument on the
    device of ``first`` (the input, or the statistics).  Without this a single meta tensor among
    CPU tensors dispatches the whole call here (Meta outranks CPU), which returned uninitialised
    CPU tensors and left the running statistics and num_batches_tracked alone, where the CPU
    kernel raises."""
    (first_name, first_tensor), = first.items()
    for name, t in tensors.items():
        if t is not None and t.device != first_tensor.device:
            raise RuntimeError(f"normfuse.{op}: {name} is on {t.device}, {first_name} on "
                               f"{first_tensor.device}")

def _stats_like(mean):
    return mean.new_empty(mean.shape)

def _param_grad(param, mean):
    if param is None:
        return mean.new_empty((mean.shape[1],))
    return mean.new_empty(param.shape)

def _like_input(x):
    """The full-size output of an op: the input's strides exactly, as the C++ ops allocate it
    (``empty_like`` would recompute the strides of size-1 dimensions)."""
    return x.new_empty_strided(x.shape, x.stride())

def _moments_fake(x):
    n, c = x.shape[0], x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)

def _affine_apply_fake(x, mean, scale, shift, relu=False):
    _same_device("affine_apply", {"input": x}, mean=mean, scale=scale, shift=shift)
    return _like_input(x)

def _backward_sums_fake(dy, x, mean, scale=None, shift=None):
    _same_device("backward_sums", {"input": x}, grad_output=dy, mean=mean, scale=scale, shift=shift)
    return _stats_like(mean), _stats_like(mean)

def _backward_apply_fake(dy, x, mean, c_dy, c_x, c_0, scale=None, shift=None):
    _same_device("backward_apply", {"input": x}, grad_output=dy, mean=mean, c_dy=c_dy, c_x=c_x, c_0=c_0,
                 scale=scale, shift=shift)
    return _like_input(x)

# The forwards mutate running_mean / running_var / num_batches_tracked in place (declared in the
# schemas): nothing to do for fake tensors.
def _bin_fake(mean, m2, plane_size, gate, weight, bias, running_mean, running_var, training, momentum, eps,
              num_batches_tracked=None):
    _same_device("bin_coefficients", {"mean": mean}, m2=m2, gate=gate, weight=weight, bias=bias,
                 running_mean=running_mean, running_var=running_var,
                 num_batches_tracked=num_batches_tracked)
    return _stats_like(mean), _stats_like(mean)

def _bin_backward_fake(sum_dy, sum_dy_xmu, mean, m2, plane_size, gate, weight, bias, running_mean, running_var,
                       training, eps):
    _same_device("bin_coefficients_backward", {"mean": mean}, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, m2=m2,
                 gate=gate, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return (_stats_like(mean), _stats_like(mean), _stats_like(mean), _param_grad(gate, mean),
            _param_grad(weight, mean), _param_grad(bias, mean))

def _iebn_fake(mean, m2, plane_size, gate_weight, gate_bias, weight, bias, running_mean, running_var, training,
               momentum, eps, num_batches_tracked=None):
    _same_device("iebn_coefficients", {"mean": mean}, m2=m2, gate_weight=gate_weight, gate_bias=gate_bias,
                 weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                 num_batches_tracked=num_batches_tracked)
    return _stats_like(mean), _stats_like(mean)

def _iebn_backward_fake(sum_dy, sum_dy_xmu, mean, m2, plane_size, gate_weight, gate_bias, weight, bias,
                        running_mean, running_var, training, eps):
    _same_device("iebn_coefficients_backward", {"mean": mean}, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, m2=m2,
                 gate_weight=gate_weight, gate_bias=gate_bias, weight=weight, bias=bias,
                 running_mean=running_mean, running_var=running_var)
    return (_stats_like(mean), _stats_like(mean), _stats_like(mean), _param_grad(gate_weight, mean),
            _param_grad(gate_bias, mean), _param_grad(weight, mean), _param_grad(bias, mean))

def _assoc_fake(mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps):
    _same_device("assoc_coefficients", {"mean": mean}, m2=m2, encoder=encoder, decoder_mean=decoder_mean,
                 decoder_var=decoder_var, weight=weight, bias=bias)
    return _stats_like(mean), _stats_like(mean)

def _assoc_backward_fake(sum_dy, sum_dy_xmu, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                         weight, bias, eps):
    _same_device("assoc_coefficients_backward", {"mean": mean}, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, m2=m2,
                 encoder=encoder, decoder_mean=decoder_mean, decoder_var=decoder_var, weight=weight,
                 bias=bias)
    return (_stats_like(mean), _stats_like(mean), _stats_like(mean), _param_grad(encoder, mean),
            _param_grad(decoder_mean, mean), _param_grad(decoder_var, mean), _param_grad(weight, mean),
            _param_grad(bias, mean))

def _ilm_fake(mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight, bias, eps):
    _same_device("ilm_coefficients", {"mean": mean}, m2=m2, encoder=encoder, decoder_weight=decoder_weight,
                 decoder_bias=decoder_bias, weight=weight, bias=bias)
    return _stats_like(mean), _stats_like(mean)

def _ilm_backward_fake(sum_dy, sum_dy_xmu, mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias,
                       weight, bias, eps):
    _same_device("ilm_coefficients_backward", {"mean": mean}, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, m2=m2,
                 encoder=encoder, decoder_weight=decoder_weight, decoder_bias=decoder_bias, weight=weight,
                 bias=bias)
    return (_stats_like(mean), _stats_like(mean), _stats_like(mean), _param_grad(encoder, mean),
            _param_grad(decoder_weight, mean), _param_grad(decoder_bias, mean), _param_grad(weight, mean),
            _param_grad(bias, mean))

def _bin_step_fake(x, gate, weight, bias, running_mean, running_var, training, momentum, eps,
                   num_batches_tracked=None, op="bin_moments_coefficients"):
    _same_device(op, {"input": x}, gate=gate, weight=weight, bias=bias,
                 running_mean=running_mean, running_var=running_var,
                 num_batches_tracked=num_batches_tracked)
    return (*_moments_fake(x), *_moments_fake(x))  # mean, m2, scale, shift

def _iebn_step_fake(x, gate_weight, gate_bias, weight, bias, running_mean, running_var, training, momentum, eps,
                    num_batches_tracked=None, op="iebn_moments_coefficients"):
    _same_device(op, {"input": x}, gate_weight=gate_weight, gate_bias=gate_bias, weight=weight,
                 bias=bias, running_mean=running_mean, running_var=running_var,
                 num_batches_tracked=num_batches_tracked)
    return (*_moments_fake(x), *_moments_fake(x))  # mean, m2, scale, shift

def _bin_step_backward_fake(dy, x, mean, m2, gate, weight, bias, running_mean, running_var, training, eps,
                            scale=None, shift=None, op="bin_sums_coefficients_backward"):
    _same_device(op, {"input": x}, grad_output=dy, mean=mean, scale=scale, shift=shift)
    return _bin_backward_fake(mean, mean, mean, m2, 1, gate, weight, bias, running_mean, running_var, training, eps)

def _iebn_step_backward_fake(dy, x, mean, m2, gate_weight, gate_bias, weight, bias, running_mean, running_var,
                             training, eps, scale=None, shift=None, op="iebn_sums_coefficients_backward"):
    _same_device(op, {"input": x}, grad_output=dy, mean=mean, scale=scale, shift=shift)
    return _iebn_backward_fake(mean, mean, mean, m2, 1, gate_weight, gate_bias, weight, bias, running_mean,
                               running_var, training, eps)

def _bin_layer_forward_fake(x, gate, weight, bias, running_mean, running_var, training, momentum, eps,
                            num_batches_tracked=None, relu=False):
    _bin_step_fake(x, gate, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked,
                   op="bin_layer_forward")
    return (_like_input(x), *_moments_fake(x), *_moments_fake(x))  # output, mean, m2, scale, shift

def _iebn_layer_forward_fake(x, gate_weight, gate_bias, weight, bias, running_mean, running_var, training, momentum,
                             eps, num_batches_tracked=None, relu=False):
    _iebn_step_fake(x, gate_weight, gate_bias, weight, bias, running_mean, running_var, training, momentum, eps,
                    num_batches_tracked, op="iebn_layer_forward")
    return (_like_input(x), *_moments_fake(x), *_moments_fake(x))  # output, mean, m2, scale, shift

def _bin_layer_backward_fake(dy, x, mean, m2, gate, weight, bias, running_mean, running_var, training, eps,
                             scale=None, shift=None):
    # grad_input, then the step's parameter gradients (its c_dy, c_x, c_0 stay inside the op)
    return (_like_input(x), *_bin_step_backward_fake(dy, x, mean, m2, gate, weight, bias, running_mean,
                                                          running_var, training, eps, scale, shift,
                                                          op="bin_layer_backward")[3:])

def _iebn_layer_backward_fake(dy, x, mean, m2, gate_weight, gate_bias, weight, bias, running_mean, running_var,
                              training, eps, scale=None, shift=None):
    return (_like_input(x), *_iebn_step_backward_fake(dy, x, mean, m2, gate_weight, gate_bias, weight, bias,
                                                           running_mean, running_var, training, eps, scale,
                                                           shift, op="iebn_layer_backward")[3:])

# AssocNorm / ILM-Norm directions: the decoders' names differ (messages name them as the schema does).
_DECODERS = {"assoc": ("decoder_mean", "decoder_var"), "ilm": ("decoder_weight", "decoder_bias")}

def _meta_layer_forward_fake(layer, x, num_groups, encoder, decoder_a, decoder_b, weight, bias, eps, relu=False):
    a, b = _DECODERS[layer]
    _same_device(f"{layer}_layer_forward", {"input": x}, encoder=encoder, **{a: decoder_a, b: decoder_b},
                 weight=weight, bias=bias)
    return (_like_input(x), *_moments_fake(x), *_moments_fake(x))  # output, mean, m2, scale, shift

def _meta_layer_backward_fake(layer, dy, x, mean, m2, num_groups, encoder, decoder_a, decoder_b, weight, bias, eps,
                              scale=None, shift=None):
    a, b = _DECODERS[layer]
    _same_device(f"{layer}_layer_backward", {"input": x}, grad_output=dy, mean=mean, m2=m2, encoder=encoder,
                 **{a: decoder_a, b: decoder_b}, weight=weight, bias=bias, scale=scale, shift=shift)
    return (_like_input(x), *(_param_grad(t, mean) for t in (encoder, decoder_a, decoder_b, weight, bias)))

def _iebn_pointwise_apply_fake(x, mean, rstd, gate_weight, gate_bias, weight, bias, relu=False):
    _same_device("iebn_pointwise_apply", {"input": x}, mean=mean, rstd=rstd, gate_weight=gate_weight,
                 gate_bias=gate_bias, weight=weight, bias=bias)
    return _like_input(x)

def _iebn_pointwise_backward_fake(dy, x, mean, rstd, gate_weight, gate_bias, weight, bias, batch_stats, relu=False):
    _same_device("iebn_pointwise_backward", {"input": x}, grad_output=dy, mean=mean, rstd=rstd,
                 gate_weight=gate_weight, gate_bias=gate_bias, weight=weight, bias=bias)
    return (_like_input(x), *(mean.new_empty(mean.shape) for _ in range(4)))

FAKES = {
    "moments": _moments_fake,
    "affine_apply": _affine_apply_fake,
    "backward_sums": _backward_sums_fake,
    "backward_apply": _backward_apply_fake,
    "bin_coefficients": _bin_fake,
    "bin_coefficients_backward": _bin_backward_fake,
    "iebn_coefficients": _iebn_fake,
    "iebn_coefficients_backward": _iebn_backward_fake,
    "assoc_coefficients": _assoc_fake,
    "assoc_coefficients_backward": _assoc_backward_fake,
    "ilm_coefficients": _ilm_fake,
    "ilm_coefficients_backward": _ilm_backward_fake,
    "bin_moments_coefficients": _bin_step_fake,
    "iebn_moments_coefficients": _iebn_step_fake,
    "bin_sums_coefficients_backward": _bin_step_backward_fake,
    "iebn_sums_coefficients_backward": _iebn_step_backward_fake,
    "bin_layer_forward": _bin_layer_forward_fake,
    "iebn_layer_forward": _iebn_layer_forward_fake,
    "bin_layer_backward": _bin_layer_backward_fake,
    "iebn_layer_backward": _iebn_layer_backward_fake,
    "assoc_layer_forward": functools.partial(_meta_layer_forward_fake, "assoc"),
    "ilm_layer_forward": functools.partial(_meta_layer_forward_fake, "ilm"),
    "assoc_layer_backward": functools.partial(_meta_layer_backward_fake, "assoc"),
    "ilm_layer_backward": functools.partial(_meta_layer_backward_fake, "ilm"),
    "iebn_pointwise_apply": _iebn_pointwise_apply_fake,
    "iebn_pointwise_backward": _iebn_pointwise_backward_fake,
}
assert set(FAKES) == set(OP_NAMES)
# The ops whose first argument is (N, C) statistics; the others' is the input (or its gradient).
_STATISTICS_FIRST = frozenset(
    name for name in FAKES if name.endswith(("_coefficients", "_coefficients_backward"))
    and not name.startswith(("bin_moments", "iebn_moments", "bin_sums", "iebn_sums")))


def _with_cuda_dtypes(name, fake):
    """``fake`` that also refuses the dtypes the CUDA kernels refuse (float64 inputs, statistics
    other than float32), as the CUDA ops do: a direct op call under torch.compile then fails
    while tracing, with the op's message, instead of at run time."""
    statistics = name in _STATISTICS_FIRST
    # the generic ops' layout constraints for Inductor, registered while a compile traces them
    # (normfuse/_inductor_layouts.py)
    layouts = _inductor_layouts.ensure if name in _inductor_layouts.OPS else None

    @functools.wraps(fake)
    def checked(first, *args, **kwargs):
        if layouts is not None:
            layouts()
        if first.device.type == "cuda":
            if statistics and first.dtype != torch.float32:
                raise RuntimeError(f"normfuse.{name}: the CUDA kernels take float32 statistics, "
                                   f"got {first.dtype} (float64 runs on the CPU backend)")
            if not statistics and first.dtype == torch.float64:
                raise RuntimeError(f"normfuse.{name}: float64 is not supported by the CUDA "
                                   "kernels (use float32, float16 or bfloat16 on the GPU, or "
                                   "the CPU backend for float64)")
        return fake(first, *args, **kwargs)
    return checked


if HAS_CPU_KERNELS:
    for _name, _fn in FAKES.items():
        torch.library.register_fake(f"normfuse::{_name}", _with_cuda_dtypes(_name, _fn))
