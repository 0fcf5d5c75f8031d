"""``normfuse.convert``: swap the normalization layers of an existing model for ours."""
from __future__ import annotations

import itertools
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .distributed import SyncBatchInstanceNorm, SyncInstanceEnhancementBatchNorm
from .fuse import fuse_relu as _fuse_relu
from .modules import (AssocNorm, BatchInstanceNorm1d, BatchInstanceNorm2d, BatchInstanceNorm3d,
                      ILMNorm, InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                      InstanceEnhancementBatchNorm3d, _BatchInstanceNorm, _has_hooks,
                      _InstanceEnhancementBatchNorm)
from .norm_act import (AssocNormAct, BatchInstanceNormAct2d, ILMNormAct,
                       InstanceEnhancementBatchNormAct2d, SyncBatchInstanceNormAct,
                       SyncInstanceEnhancementBatchNormAct, _NormAct)

_BATCH_NORM_TARGETS = {
    "bin": {nn.BatchNorm1d: BatchInstanceNorm1d, nn.BatchNorm2d: BatchInstanceNorm2d,
            nn.BatchNorm3d: BatchInstanceNorm3d, nn.SyncBatchNorm: SyncBatchInstanceNorm},
    "iebn": {nn.BatchNorm1d: InstanceEnhancementBatchNorm1d,
             nn.BatchNorm2d: InstanceEnhancementBatchNorm2d,
             nn.BatchNorm3d: InstanceEnhancementBatchNorm3d,
             nn.SyncBatchNorm: SyncInstanceEnhancementBatchNorm},
}
# timm's norm layers, by (module, class name) without importing timm (``timm.layers.norm_act``
# / ``.norm``; ``timm.models.layers`` in timm < 0.9): each is a subclass of the torch norm named
# here computing that norm, the norm + act layers then applying their ``drop`` and ``act``
# modules (normfuse.norm_act).
class _TimmLayer(NamedTuple):
    base: type  # the torch norm it derives from and computes
    targets: dict  # convert's target -> the normfuse class that replaces it


_GROUP_NORM_ACT = _TimmLayer(nn.GroupNorm, {"assoc": AssocNormAct, "ilm": ILMNormAct})
_GROUP_NORM = _TimmLayer(nn.GroupNorm, {"assoc": AssocNorm, "ilm": ILMNorm})
_TIMM_LAYERS = {
    ("norm_act", "BatchNormAct2d"): _TimmLayer(nn.BatchNorm2d,
                                               {"bin": BatchInstanceNormAct2d,
                                                "iebn": InstanceEnhancementBatchNormAct2d}),
    ("norm_act", "SyncBatchNormAct"): _TimmLayer(nn.SyncBatchNorm,
                                                 {"bin": SyncBatchInstanceNormAct,
                                                  "iebn": SyncInstanceEnhancementBatchNormAct}),
    ("norm_act", "GroupNormAct"): _GROUP_NORM_ACT,
    ("norm_act", "GroupNorm1Act"): _GROUP_NORM_ACT,
    ("norm", "GroupNorm"): _GROUP_NORM,  # resnet50_gn's
    ("norm", "GroupNorm1"): _GROUP_NORM,  # one group: poolformer's, mobilevitv2's
}
TARGETS = ("bin", "iebn", "assoc", "ilm")
# The kind of each normfuse layer (subclasses included), for convert's warning about a model
# already converted to another kind.
_KIND_OF = ((_BatchInstanceNorm, "bin"), (_InstanceEnhancementBatchNorm, "iebn"),
            (AssocNorm, "assoc"), (ILMNorm, "ilm"))
# Keyword options of ``convert`` per target (passed to the new layers).
_OPTIONS = {"ilm": ("key_group_size", "reduction")}


def _factory(module: nn.Module) -> dict:
    """Device and dtype of ``module``'s first floating-point tensor, parameters before buffers
    ({} if none): a norm's own (its weight, else its running_mean), or, for a norm with no
    tensors of its own (``GroupNorm(affine=False)``, ``BatchNorm(affine=False,
    track_running_stats=False)``), the whole model's, which its replacement takes."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _carry_requires_grad(old: nn.Module, new: nn.Module) -> None:
    """A frozen ``weight`` / ``bias`` (``requires_grad=False``, e.g. a fine-tuned backbone's
    norms) stays frozen; the new layer's own parameters (gates, meta network) stay trainable."""
    for name in ("weight", "bias"):
        theirs, ours = getattr(old, name, None), getattr(new, name, None)
        if isinstance(theirs, torch.Tensor) and isinstance(ours, nn.Parameter):
            ours.requires_grad_(theirs.requires_grad)


def _from_batch_norm(bn: nn.modules.batchnorm._BatchNorm, cls, to: str) -> nn.Module:
    # nn.BatchNorm reads its running statistics in eval whenever the buffers exist, and updates
    # them in training only when track_running_stats says so; the flag is often changed after
    # construction (True with the buffers set to None, or False with trained buffers kept), so
    # the buffers are carried as they are and the flag set afterwards.
    kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=True,
                  **_factory(bn))
    if isinstance(bn, nn.SyncBatchNorm):  # -> the synchronized layer, over the same group
        kwargs["process_group"] = bn.process_group
    new = cls(bn.num_features, **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias") if bn.affine else ():
            theirs = getattr(bn, name)
            if theirs is None:  # nn.BatchNorm2d(bias=False) (torch >= 2.12), or removed by hand
                new.register_parameter(name, None)
            else:
                getattr(new, name).copy_(theirs)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            theirs = getattr(bn, name)
            if theirs is None:
                setattr(new, name, None)
            else:
                getattr(new, name).copy_(theirs)
    new.track_running_stats = bn.track_running_stats
    _carry_requires_grad(bn, new)
    return new


def _timm_layer(module: nn.Module, to: str):
    """The normfuse class that replaces ``module`` (for target ``to``) if ``module`` is one of
    timm's norm layers (``_TIMM_LAYERS``), else None."""
    cls = type(module)
    package, _, last = cls.__module__.rpartition(".")
    entry = _TIMM_LAYERS.get((last, cls.__name__))
    if entry is None or package.split(".")[0] != "timm" or not issubclass(cls, entry.base):
        return None
    return entry.targets.get(to)


def _take_post(old: nn.Module, new: nn.Module) -> None:
    """A timm norm + act layer's ``drop`` and ``act`` modules go to its replacement, as they
    are (timm's own ``convert_sync_batchnorm`` moves them so); a ``SyncBatchNormAct`` made
    without them has none (identity)."""
    for name in ("drop", "act"):
        module = getattr(old, name, None)
        if isinstance(module, nn.Module):
            setattr(new, name, module)


def _from_group_norm(gn: nn.GroupNorm, cls=AssocNorm) -> nn.Module:
    new = cls(gn.num_groups, gn.num_channels, eps=gn.eps, **_factory(gn))
    with torch.no_grad():
        # A fresh AssocNorm's decoder gives omega = 0.5 + B_omega: start from the same function.
        # No weight (affine=False) means 1, no bias (affine=False, or bias=False) means 0.
        weight, bias = getattr(gn, "weight", None), getattr(gn, "bias", None)
        new.weight.copy_(0.5 if weight is None else weight - 0.5)
        new.bias.copy_(0.0 if bias is None else bias)
    _carry_requires_grad(gn, new)
    return new


def _ilm_from_group_norm(gn: nn.GroupNorm, where: str, options: dict,
                         cls=ILMNorm) -> nn.Module:
    try:
        new = cls(gn.num_channels, gn.num_groups, eps=gn.eps, **options, **_factory(gn))
    except ValueError as exc:
        raise ValueError(f"convert: cannot convert {where} ({gn}) to ILMNorm: {exc}") from None
    with torch.no_grad():
        # Zero decoders give omega = sigmoid(0) + weight = 0.5 + weight and beta = bias: the
        # GroupNorm's function, except that ILM-Norm standardises with the unbiased variance.
        new.decoder_weight.zero_()
        new.decoder_bias.zero_()
        weight, bias = getattr(gn, "weight", None), getattr(gn, "bias", None)
        new.weight.copy_(0.5 if weight is None else weight - 0.5)
        new.bias.copy_(0.0 if bias is None else bias)
    _carry_requires_grad(gn, new)
    return new


def _replacement(child: nn.Module, to: str, name: str, options: dict, fallback: dict):
    new = _replacement_of(child, to, name, options)
    if new is not None and fallback and not _factory(child):
        new.to(**fallback)  # else its parameters would sit on the default device and dtype
    return new


def _replacement_of(child: nn.Module, to: str, name: str, options: dict):
    timm_cls = _timm_layer(child, to)
    if to in ("assoc", "ilm"):
        if type(child) is not nn.GroupNorm and timm_cls is None:
            return None
        if to == "assoc":
            new = _from_group_norm(child, timm_cls or AssocNorm)
        else:
            where = (f"the {type(child).__name__} at {name!r}" if name
                     else f"the {type(child).__name__}")
            new = _ilm_from_group_norm(child, where, options, timm_cls or ILMNorm)
    else:
        cls = _BATCH_NORM_TARGETS[to].get(type(child)) or timm_cls
        if cls is None:
            return None
        new = _from_batch_norm(child, cls, to)
    if isinstance(new, _NormAct):
        _take_post(child, new)
    return new


def _left_as_is(module: nn.Module, to: str) -> bool:
    """A norm of the kind ``to`` replaces that ``convert`` does not take: a subclass (it may
    compute something else, which the replacement would silently drop), a lazy norm not
    initialised yet (nothing to carry over), or torchvision's ``FrozenBatchNorm2d`` (a fixed
    affine map by design, as in detection backbones; not an nn.BatchNorm, so named here by its
    class, without importing torchvision; timm's ``FrozenBatchNormAct2d`` likewise)."""
    if to in ("assoc", "ilm"):
        return isinstance(module, nn.GroupNorm)
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            or type(module).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"))


def _other_kinds(module: nn.Module, to: str) -> list:
    """"path (type)" of the normfuse layers in ``module`` (itself included) that replaced the
    norm ``to`` replaces, but are of another kind (a BIN model converted to "iebn"): convert
    takes only torch's norms, so they stay as they are."""
    found = []
    for path, sub in module.named_modules():
        kind = next((k for cls, k in _KIND_OF if isinstance(sub, cls)), None)
        # another kind that replaces the same torch norm (BatchNorm's targets, or GroupNorm's)
        if (kind is not None and kind != to
                and (kind in _BATCH_NORM_TARGETS) == (to in _BATCH_NORM_TARGETS)):
            found.append(f"{path or 'the module itself'} ({type(sub).__name__})")
    return found


def _scripted_norms(module: nn.Module, to: str) -> list[str]:
    """Names of the norms of the kind ``to`` replaces inside a TorchScript module (compiled:
    none of them can be replaced), by their classes' original names."""
    wanted = (("GroupNorm",) if to in ("assoc", "ilm")
              else ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"))
    return [sub_name or "itself" for sub_name, sub in module.named_modules()
            if getattr(sub, "original_name", None) in wanted]


def _replacements(module: nn.Module, to: str, name: str, options: dict, out: list,
                  memo: dict | None = None, fallback: dict | None = None,
                  skipped: list | None = None):
    """Every (parent, attribute, new layer, path) below ``module``, built before any is installed, so
    that a layer that cannot be converted leaves the model untouched.  A norm registered at
    several places (one module object used twice) gets one replacement, installed at each of
    them, so it stays shared; ``_modules`` rather than ``named_children()``, which skips a
    module's second name within one parent."""
    memo = {} if memo is None else memo  # id(child) -> its replacement, or None: none needed
    skipped = [] if skipped is None else skipped  # "path (type)" of the norms left as they are
    for child_name, child in module._modules.items():
        if child is None:
            continue
        path = f"{name}.{child_name}" if name else child_name
        if id(child) in memo:
            if memo[id(child)] is not None:
                out.append((module, child_name, memo[id(child)], path))
            continue
        if isinstance(child, torch.jit.ScriptModule) and _scripted_norms(child, to):
            raise TypeError(f"convert: {path} is a TorchScript module holding norms convert would "
                            f"replace ({', '.join(_scripted_norms(child, to)[:3])}); convert the "
                            f"eager model, then script or export it")
        new = _replacement(child, to, path, options, fallback)
        memo[id(child)] = new
        if new is not None:
            out.append((module, child_name, new.train(child.training), path))
        elif _left_as_is(child, to):  # as it is, children included (timm's SplitBatchNorm2d
            skipped.append(f"{path} ({type(child).__name__})")  # holds BatchNorm2d's of its own)
        else:
            _replacements(child, to, path, options, out, memo, fallback, skipped)
    return out


def convert(module: nn.Module, to: str, *, fuse_relu: bool = False, **options) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (``to="bin"`` or ``"iebn"``; ``nn.SyncBatchNorm``
    by ``SyncBatchInstanceNorm`` / ``SyncIEBN`` over its process group) or ``nn.GroupNorm``
    (``to="assoc"`` or ``"ilm"``) in ``module`` by the normfuse layer, in place, and return
    ``module`` (with ``fuse_relu=True``, the module to use: see below).

    Weights (and whether they are frozen: ``requires_grad``), running statistics,
    ``num_batches_tracked``, ``track_running_stats``, device, dtype and train/eval mode are carried
    over (a norm with no tensors of its own, e.g. ``GroupNorm(affine=False)``, takes the model's
    device and dtype), into new parameters: build the optimizer after converting, and parameters
    tied between two norms are no longer tied. Hooks registered on a norm are not carried (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm``). A converted BIN starts with gates at 1, so it
    computes exactly what the batch norm did; IEBN starts from the paper's gate initialisation (a
    scale of sigmoid(-1) on the batch-norm weight until trained); AssocNorm starts as the same
    GroupNorm function (``B_omega = weight - 0.5`` with zero decoders); ILMNorm likewise (``weight =
    gn.weight - 0.5``, ``bias = gn.bias``, zero decoders), except that ILM-Norm standardises with
    the unbiased group variance (outputs smaller by about ``1 / (2 n)`` relative, for ``n`` values
    per group). ``to="ilm"`` takes ``key_group_size`` (default 16) and ``reduction`` (16) as keyword
    options; a GroupNorm whose channel count ``key_group_size`` does not divide is an error naming
    it. A ``module`` that is itself a norm layer is returned converted, like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    timm's norm layers are taken too (recognised by module and class name, without importing
    timm): ``BatchNormAct2d``, ``SyncBatchNormAct``, ``GroupNormAct`` and ``GroupNorm1Act``, a
    norm that then applies its own ``drop`` and ``act`` modules, become the normfuse norm + act
    layer of the same shape (``normfuse.norm_act``) holding those very modules, so timm's
    ``state_dict`` keys stay; timm's ``GroupNorm`` and ``GroupNorm1`` become AssocNorm / ILMNorm.

    Norms ``convert`` does not take (other subclasses, lazy norms, ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``, normfuse layers of another kind) are left as they are, their
    children included, and named in one warning each; a TorchScript module is a ``TypeError``
    (convert, then script).

    ``fuse_relu=True`` then fuses each normfuse norm whose output goes only into a ReLU
    (``nn.ReLU``, ``torch.relu``/``relu_``, ``F.relu``, ``Tensor.relu``/``relu_``, in place or
    not) called by the same forward: the model is traced with ``torch.fx`` (norms kept as
    leaves), the norm gets ``activation="relu"`` and that ReLU call goes.  A norm whose output
    has another user (a residual add, a second consumer), any call site not followed by a
    ReLU, or a ReLU in another forward than the norm's (a norm ending a submodule's forward)
    stays unfused; so does a pair with a hooked ReLU module or a hooked norm.  A norm + act
    layer whose ``act`` is an ``nn.ReLU`` (its ``drop`` a plain identity, neither with hooks)
    takes it in without tracing (``activation="relu"``, ``act`` an ``nn.Identity``); one whose
    ``drop`` or ``act`` is anything but a plain identity is never fused with a ReLU after it.
    A pair whose ReLU is an ``nn.ReLU`` module called only after fused norms (plain
    ``nn.Identity`` modules may sit in between) is fused in place: that module becomes an
    ``nn.Identity``.  A pair whose ReLU is a function call, or a module called elsewhere too,
    is fused by replacing the module whose forward makes it with a ``torch.fx.GraphModule`` of
    that forward (``normfuse.fuse.FusedGraphModule``: its submodule objects, parameters,
    buffers, plain attributes, class constants and hooks), where one can stand for it: a class
    adding only ``__init__``, ``forward`` and constants to ``nn.Module``, a forward without
    optional arguments, called with tensors, that sets no grad mode (torchvision's blocks; the
    plain attributes it reads are then held by the graph, and setting one raises); any other
    module (a model class, ``nn.Sequential``) stays itself, and such a pair is left unfused
    and named in a ``UserWarning``.  The result computes what the unfused conversion computes,
    in train and eval mode: **use the returned module**, the input model changed in place unless
    the model itself became a GraphModule (the input model then still computes the same
    function, since ReLU is idempotent, but runs the ReLU passes the graph dropped).  A module
    whose forward cannot be traced (data-dependent control flow, a forward that branches on
    ``self.training``, which a graph would freeze, or optional arguments where it is traced on
    its own) is kept as a leaf of the graph around it and fused on its own, and one
    ``UserWarning`` names such modules with the reason; if the model itself cannot be traced,
    the input model is returned with fused children.  Fusing changes the modules themselves:
    other code calling a fused norm directly gets ``relu(norm(x))`` (README, "Converting with
    the ReLUs fused").
    """
    if to not in TARGETS:
        raise ValueError(f"convert: to must be one of {TARGETS}, got {to!r}")
    unknown = sorted(set(options) - set(_OPTIONS.get(to, ())))
    if unknown:
        raise ValueError(f"convert: to={to!r} takes no option {unknown[0]!r} (options: "
                         f"{list(_OPTIONS.get(to, ()))})")
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):  # its submodules are compiled: none is replaced
        raise TypeError("convert: module is a TorchScript module; convert the eager model, then "
                        "script or export it")
    if not isinstance(fuse_relu, bool):
        raise TypeError(f"convert: fuse_relu must be True or False, got {fuse_relu!r}")
    fallback = _factory(module)
    new = _replacement(module, to, "", options, fallback)
    if new is not None:
        new.train(module.training)  # a bare norm layer: only its own act can be fused
        return _fuse_relu(new) if fuse_relu else new
    skipped = [f"the module itself ({type(module).__name__})"] if _left_as_is(module, to) else []
    replacements = _replacements(module, to, "", options, [], None, fallback, skipped)
    hooked = sorted({f"{path} ({type(getattr(parent, child_name)).__name__})"
                     for parent, child_name, _, path in replacements
                     if _has_hooks(getattr(parent, child_name))})
    for parent, child_name, layer, _ in replacements:
        setattr(parent, child_name, layer)
    if hooked:
        warnings.warn(f"convert(..., {to!r}): the forward / backward hooks of {', '.join(hooked)} "
                      "stay on the replaced module, not on its normfuse layer (as "
                      "nn.SyncBatchNorm.convert_sync_batchnorm does); register them again on "
                      "the converted model.", stacklevel=2)
    if skipped:
        wanted = ("nn.GroupNorm" if to in ("assoc", "ilm")
                  else "nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm")
        warnings.warn(f"convert(..., {to!r}) left {len(skipped)} normalization layer(s) as they "
                      f"are: {', '.join(skipped)}. convert takes {wanted} (exactly these "
                      "classes) and timm's norm layers built on them: another subclass may "
                      "compute something else, a lazy norm has no parameters yet (run one "
                      "forward first), and a FrozenBatchNorm2d is frozen by design.",
                      stacklevel=2)
    others = _other_kinds(module, to)
    if others:
        warnings.warn(f"convert(..., {to!r}) left {len(others)} normfuse layer(s) of another kind "
                      f"as they are: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}. "
                      "convert replaces torch's norms only: convert the original model instead.",
                      stacklevel=2)
    if not replacements and not skipped and not others and not _has_kind(module, to):
        _warn_nothing_replaced(module, to)
    if fuse_relu:
        return _fuse_relu(module)
    return module


def _has_kind(module: nn.Module, to: str) -> bool:
    """Whether ``module`` already holds normfuse layers of the kind ``to`` (converted before: a
    second call, e.g. to fuse the ReLUs, finds nothing left to replace and says nothing)."""
    return any(k == to for sub in module.modules() for cls, k in _KIND_OF if isinstance(sub, cls))


def _warn_nothing_replaced(module: nn.Module, to: str) -> None:
    """convert found no norm of the kind ``to`` replaces: say so, and name the targets that take
    the norms the model does have (a model of GroupNorms converted to "bin" stays as it was)."""
    group = to in ("assoc", "ilm")
    other = [path or "the module itself" for path, sub in module.named_modules()
             if (isinstance(sub, nn.modules.batchnorm._BatchNorm) if group
                 else isinstance(sub, nn.GroupNorm))]
    kind, targets = ("batch norm", '"bin" and "iebn"') if group else ("nn.GroupNorm", '"assoc" and "ilm"')
    listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
    hint = f" It has {len(other)} {kind} layer(s) ({listed}), which {targets} replace." if other else ""
    warnings.warn(f"convert(..., {to!r}) replaced nothing: the model has no "
                  f"{'nn.GroupNorm' if group else 'nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm'}."
                  + hint, stacklevel=3)
