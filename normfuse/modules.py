"""Drop-in modules: BIN and IEBN for ``nn.BatchNorm1d/2d/3d``, AssocNorm and ILMNorm for
``nn.GroupNorm``."""
from __future__ import annotations

import math
import operator

import torch
from torch import nn
from torch.fx import Proxy

from . import functional as F
from ._autograd import ilm_devices, one_call_step, run_layer
from ._checks import assoc_layer_ok, batch_layer_ok, ilm_layer_ok, relu_flag
from .backends import compiled_devices


def _fx_leaf(module: nn.Module, input: Proxy) -> Proxy:
    """Under ``torch.fx.symbolic_trace`` (the input is a Proxy): the layer as one ``call_module``
    node, which is how fx records torch.nn's own norm layers (its default tracer keeps only
    torch.nn modules as leaves). Tracing into the layer would fail: its checks and op calls need
    real tensors. fx tools (create_feature_extractor, FX quantization) then see a normfuse layer
    where they saw nn.BatchNorm2d."""
    tracer = input.tracer
    if module is getattr(tracer, "root", None):  # a call_module node needs a submodule
        raise torch.fx.proxy.TraceError(
            f"{type(module).__name__}: torch.fx cannot trace a normfuse layer as the root module "
            f"(its ops need real tensors); trace a module that holds it, e.g. "
            f"nn.Sequential(layer), where it is recorded as one call_module node")
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks (module-level), which a fusion that stops
    calling it would silently drop."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


class _NotScriptable:
    """``torch.jit.script`` cannot compile a normfuse layer (its forward dispatches between
    backends in Python); TorchScript asks ``__prepare_scriptable__`` first, so say so there,
    instead of the compiler's complaint about some line of the forward."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script cannot compile normfuse layers; use "
            f"torch.export or torch.compile, or torch.jit.trace (BIN, IEBN and AssocNorm on the "
            f"cpu and cuda backends trace as one op; README, 'Export and deployment')")


class _Activation:
    """The fused activation of every module: ``activation`` None or "relu" (``relu(norm(x))``
    from the layer's own apply kernel, its mask recomputed in the backward: no extra pass, no
    saved mask).  A plain attribute, not state: the state_dict is the unfused layer's."""

    activation = None  # also the value of modules pickled before the attribute existed

    def _set_activation(self, activation) -> None:
        relu_flag(activation, type(self).__name__)  # refuses anything but None and "relu"
        self.activation = activation

    def _relu(self) -> bool:
        act = self.activation
        return act is not None and relu_flag(act, type(self).__name__)

    def _activation_repr(self) -> str:
        return "" if self.activation is None else f", activation={self.activation!r}"


class _BatchStatsNorm(_NotScriptable, _Activation, nn.Module):
    """Buffers and train/eval semantics of ``nn.BatchNorm`` (``torch.nn.modules.batchnorm``)."""

    _version = 2
    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 activation: str | None = None):
        super().__init__()
        self._set_activation(activation)
        num_features = _index("num_features", num_features)  # an int, or a numpy integer
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _affine_parameters(self, affine: bool, bias: bool, factory: dict) -> None:
        """``weight`` and ``bias`` as ``nn.BatchNorm`` has them: (C,) parameters, or None
        (both with ``affine=False``; the bias alone with ``bias=False``, torch >= 2.12's
        ``nn.BatchNorm2d(bias=False)``)."""
        self.affine = affine
        for name, wanted in (("weight", affine), ("bias", affine and bias)):
            param = nn.Parameter(torch.empty(self.num_features, **factory)) if wanted else None
            self.register_parameter(name, param)

    def _reset_affine(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _bias_repr(self) -> str:
        return ", bias=False" if self.affine and self.bias is None else ""

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _batch_arguments(self):
        """``(running_mean, running_var, use_batch_stats, checked_momentum)`` as
        ``nn.BatchNorm`` forms them, without touching ``num_batches_tracked`` (the layer's
        coefficient op counts the batch, after every check: see ``_counter``).
        ``checked_momentum`` is what the checks see (0 for ``momentum=None``); the update
        factor itself is ``_factor()``, read after the checks."""
        use_batch = self.training or self.running_mean is None
        tracked = not self.training or self.track_running_stats
        return (self.running_mean if tracked else None, self.running_var if tracked else None,
                use_batch, 0.0 if self.momentum is None else self.momentum)

    def _factor(self) -> float:
        """The running statistics' update factor: ``momentum``, or with ``momentum=None`` the
        cumulative average's ``1 / (batches + 1)``, which reads ``num_batches_tracked`` on the
        host: called after the checks (a counter of the wrong kind gets their message)."""
        if self.momentum is not None:
            return self.momentum
        if (self.training and self.track_running_stats
                and self.num_batches_tracked is not None):  # None: factor 0, as nn.BatchNorm
            return 1.0 / (_counted(self.num_batches_tracked, type(self).__name__) + 1.0)
        return 0.0

    def _fast_arguments(self):
        """``(running_mean, running_var, use_batch, factor, counter)`` as ``_batch_arguments``
        and ``_counter`` give them, read straight from ``_buffers`` (``nn.Module.__getattr__``
        costs ~0.6 us an attribute); None with ``momentum=None`` (whose factor reads
        ``num_batches_tracked`` on the host, after the checks: the checked path does that)."""
        momentum = self.momentum
        if momentum is None:
            return None
        buffers = self._buffers
        try:  # a buffer replaced by a plain attribute: the checked path reads it
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
        except KeyError:
            return None
        training = self.training
        use_batch = training or running_mean is None
        if training:
            if self.track_running_stats:
                return running_mean, running_var, use_batch, momentum, counter
            return None, None, use_batch, momentum, None
        return running_mean, running_var, use_batch, momentum, None

    # Set by BIN / IEBN: the layer's name in run_layer, its parameters in the op's order (the
    # first ``_required`` of them must be tensors, the others may be None), and their getter
    # from ``_parameters`` (plain indexing: cheap, and torch.compile traces it).
    _layer = ""
    _layer_code = -1  # normfuse._C.batch_layer_step's layer: 0 BIN, 1 IEBN
    _param_names: tuple = ()
    _required = 0
    _get_params = None

    def _named_params(self):
        """``(name, tensor, optional)`` of the layer's parameters, in the op's order."""
        return tuple((name, getattr(self, name), i >= self._required)
                     for i, name in enumerate(self._param_names))

    def forward(self, input):
        step = one_call_step(0)
        if step is not None:  # the common path as one C call (csrc/python_layer_step.cpp)
            y = step(self._layer_code, input, self._parameters, self._buffers, self.training,
                     self.track_running_stats, self.momentum, self.eps, self.num_features,
                     self.activation, self._ranks, compiled_devices())
            if y is not NotImplemented:
                return y
        if isinstance(input, Proxy):
            return _fx_leaf(self, input)
        relu = self._relu()
        fast = self._fast_arguments()
        try:  # a parameter replaced by a plain attribute: the checked path reads it
            params = self._get_params(self._parameters)
        except KeyError:
            fast = None
        if fast is not None:  # the common path: one predicate (normfuse/_checks.py)
            running_mean, running_var, use_batch, factor, counter = fast
            k = self._required
            if batch_layer_ok(input, self._ranks, self.num_features, use_batch, params[:k],
                              params[k:], running_mean, running_var, counter, factor,
                              self.eps):
                return run_layer(self._layer, input, running_mean, running_var, use_batch,
                                 factor, self.eps, 0, params, counter, relu,
                                 who=type(self).__name__)
        # Every check (each once, in the documented order), the buffers read through nn.Module.
        running_mean, running_var, use_batch, momentum = self._batch_arguments()
        counter = self._counter()
        named = self._named_params()
        F.check_batch_layer(type(self).__name__, input, running_mean, running_var, named,
                            self.training, momentum, self.eps, counter, self._ranks,
                            self.num_features)
        factor = self._factor()
        return run_layer(self._layer, input, running_mean, running_var, use_batch, factor,
                         self.eps, 0, tuple(t for _, t, _ in named), counter, relu,
                         who=type(self).__name__)

    def _counter(self):
        """The ``num_batches_tracked`` buffer when this call counts a batch (training with
        tracked statistics), else None.  The layer's coefficient op increments it in place, in
        the kernel that updates the running statistics: no launch of its own."""
        if self.training and self.track_running_stats:
            return self.num_batches_tracked
        return None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"track_running_stats={self.track_running_stats}{self._activation_repr()}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # a checkpoint without the counter keeps the module's own (a 0 would restart
            # momentum=None's cumulative average over the loaded statistics), as nn.BatchNorm does
            own = self.num_batches_tracked
            state_dict[key] = (own if isinstance(own, torch.Tensor) and own.device.type != "meta"
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _BatchInstanceNorm(_BatchStatsNorm):
    """Batch-Instance Normalization (Nam & Kim, NeurIPS 2018).

    ``y = (gate * xhat_batch + (1 - gate) * xhat_instance) * weight + bias``; ``gate`` (rho)
    starts at 1 (plain batch norm) and should be kept in [0, 1] during training
    (``normfuse.attach_gate_clipping``).  With ``affine=False`` the gate stays learnable;
    ``bias=False`` (keyword only, as ``nn.BatchNorm2d``'s) leaves out the bias alone.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, activation: str | None = None):
        super().__init__(num_features, eps, momentum, track_running_stats, device, dtype,
                         activation=activation)
        factory = {"device": device, "dtype": dtype}
        self._affine_parameters(affine, bias, factory)
        self.gate = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()
        nn.init.ones_(self.gate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", affine={self.affine}" + self._bias_repr()

    _layer = "bin"
    _layer_code = 0
    _param_names = ("gate", "weight", "bias")
    _required = 1
    _get_params = staticmethod(lambda p: (p["gate"], p["weight"], p["bias"]))


class _InstanceEnhancementBatchNorm(_BatchStatsNorm):
    """Instance Enhancement Batch Normalization (Liang et al., AAAI 2020).

    ``y = xhat_batch * weight * sigmoid(mean_hw(x) * gate_weight + gate_bias) + bias`` with
    ``gate_weight`` starting at 0 and ``gate_bias`` at -1, as in the paper.  Checkpoints of the
    authors' code (``weight_readjust``/``bias_readjust`` of shape ``(1, C, 1, 1)``) load.
    ``affine`` (keyword only: the positional order, without it, is the public signature): with
    ``affine=False`` there is no weight/bias (1 and 0), but the gates stay learnable (they are
    what makes the layer IEBN); ``bias=False`` (keyword only, as ``nn.BatchNorm2d``'s) leaves
    out the bias alone.
    """

    affine = True  # also the value of modules pickled before the argument existed

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 affine: bool = True, bias: bool = True, activation: str | None = None):
        super().__init__(num_features, eps, momentum, track_running_stats, device, dtype,
                         activation=activation)
        factory = {"device": device, "dtype": dtype}
        self._affine_parameters(affine, bias, factory)
        self.gate_weight = nn.Parameter(torch.empty(num_features, **factory))
        self.gate_bias = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()
        nn.init.zeros_(self.gate_weight)
        nn.init.constant_(self.gate_bias, -1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.affine else ", affine=False") + self._bias_repr()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The authors store every per-channel parameter as (1, C, 1, 1).
        for theirs, ours in (("weight_readjust", "gate_weight"), ("bias_readjust", "gate_bias"),
                             ("weight", "weight"), ("bias", "bias")):
            value = state_dict.get(prefix + theirs)
            if value is not None and value.dim() == 4 and value.numel() == self.num_features:
                del state_dict[prefix + theirs]
                state_dict[prefix + ours] = value.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    _layer = "iebn"
    _layer_code = 1
    _param_names = ("gate_weight", "gate_bias", "weight", "bias")
    _required = 2
    _get_params = staticmethod(lambda p: (p["gate_weight"], p["gate_bias"], p["weight"],
                                          p["bias"]))


def _counted(num_batches_tracked, who: str) -> float:
    """``num_batches_tracked`` as a number, for ``momentum=None``'s cumulative average."""
    try:
        return float(num_batches_tracked)
    except RuntimeError as e:  # a mapped counter under torch.func.vmap has no single value
        if not torch._C._are_functorch_transforms_active():
            raise
        raise RuntimeError(
            f"{who}: momentum=None (a cumulative average) reads num_batches_tracked as one "
            "number, which torch.func.vmap cannot give for mapped statistics (nn.BatchNorm2d "
            "fails alike); give a momentum") from e


def _with_rank(base, name: str, ranks: tuple, shape: str):
    cls = type(name, (base,), {"_ranks": ranks, "__module__": __name__})
    cls.__doc__ = f"{base.__doc__}\n    Input: {shape}."
    return cls


BatchInstanceNorm1d = _with_rank(_BatchInstanceNorm, "BatchInstanceNorm1d", (2, 3),
                                 "(N, C) or (N, C, L)")
BatchInstanceNorm2d = _with_rank(_BatchInstanceNorm, "BatchInstanceNorm2d", (4,), "(N, C, H, W)")
BatchInstanceNorm3d = _with_rank(_BatchInstanceNorm, "BatchInstanceNorm3d", (5,),
                                 "(N, C, D, H, W)")
InstanceEnhancementBatchNorm1d = _with_rank(_InstanceEnhancementBatchNorm,
                                            "InstanceEnhancementBatchNorm1d", (2, 3),
                                            "(N, C) or (N, C, L)")
InstanceEnhancementBatchNorm2d = _with_rank(_InstanceEnhancementBatchNorm,
                                            "InstanceEnhancementBatchNorm2d", (4,),
                                            "(N, C, H, W)")
InstanceEnhancementBatchNorm3d = _with_rank(_InstanceEnhancementBatchNorm,
                                            "InstanceEnhancementBatchNorm3d", (5,),
                                            "(N, C, D, H, W)")
IEBN1d, IEBN2d, IEBN3d = (InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                          InstanceEnhancementBatchNorm3d)


def _meta_network_parameters(module, decoders, columns, embed, channels, factory) -> None:
    """AssocNorm's and ILMNorm's parameters, uninitialised, in this order (the state_dict's):
    ``encoder (embed, columns)``, each of ``decoders`` ``(columns, embed)``, ``weight`` and
    ``bias (channels,)``."""
    module.encoder = nn.Parameter(torch.empty(embed, columns, **factory))
    for name in decoders:
        setattr(module, name, nn.Parameter(torch.empty(columns, embed, **factory)))
    module.weight = nn.Parameter(torch.empty(channels, **factory))
    module.bias = nn.Parameter(torch.empty(channels, **factory))


def _index(name: str, value, hint: str = "") -> int:
    """``value`` as an int: an int or int-like (numpy integers), not a bool or a float, else a
    ValueError naming ``name`` (``hint`` appended)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")
    return operator.index(value)


def _positive_index(name: str, value) -> int:
    """``_index(name, value)``, and a ValueError naming ``name`` unless it is positive."""
    index = _index(name, value)
    if index <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return index


def default_embed_dim(num_groups: int) -> int:
    """Bottleneck width M of AssocNorm's auto-encoder when not given: half the groups."""
    return max(1, num_groups // 2)


class AssocNorm(_NotScriptable, _Activation, nn.Module):
    """Associate Normalization: GroupNorm with per-sample scale and shift predicted from the
    group means and variances by a small auto-encoder (shared encoder ``(M, G)``, decoders
    ``(G, M)``), plus per-channel ``weight`` (B_omega, starts at 1) and ``bias`` (B_beta, 0).

    Choices the paper leaves open (docs/layers.md): ``embed_dim`` M defaults to ``G // 2``
    (at least 1), a 2x bottleneck; the encoder starts like ``nn.Linear(G, M)``'s weight
    (Kaiming-uniform) and both decoders at zero, so a fresh layer is exactly
    ``GroupNorm`` with weight ``0.5 + B_omega`` = 1.5 and the auto-encoder learns from there.
    Input ``(N, C, *)`` like ``nn.GroupNorm``; train and eval behave the same.
    """

    def __init__(self, num_groups: int, num_channels: int, embed_dim: int | None = None,
                 eps: float = 1e-5, device=None, dtype=None, *, activation: str | None = None):
        super().__init__()
        self._set_activation(activation)
        num_groups, num_channels = (_positive_index("num_groups", num_groups),
                                    _positive_index("num_channels", num_channels))
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        embed_dim = default_embed_dim(num_groups) if embed_dim is None else embed_dim
        embed_dim = _index("embed_dim", embed_dim, " (AssocNorm's third argument is embed_dim, "
                           "where nn.GroupNorm has eps: pass eps=... by keyword)")
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        factory = {"device": device, "dtype": dtype}
        self.num_groups, self.num_channels, self.embed_dim, self.eps = (
            num_groups, num_channels, embed_dim, eps)
        _meta_network_parameters(self, ("decoder_mean", "decoder_var"), num_groups, embed_dim,
                                 num_channels, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.encoder, a=math.sqrt(5))
        nn.init.zeros_(self.decoder_mean)
        nn.init.zeros_(self.decoder_var)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, embed_dim={self.embed_dim}, "
                f"eps={self.eps}{self._activation_repr()}")

    def forward(self, input):
        step = one_call_step(1)
        if step is not None:  # the common path as one C call (csrc/python_layer_step.cpp)
            y = step(input, self._parameters, self.num_channels, self.num_groups, self.eps,
                     self.activation, compiled_devices())
            if y is not NotImplemented:
                return y
        if isinstance(input, Proxy):
            return _fx_leaf(self, input)
        relu = self._relu()
        params = self._parameters
        try:  # a parameter replaced by a plain attribute: the checked path reads it
            args = (params["encoder"], params["decoder_mean"], params["decoder_var"],
                    params["weight"], params["bias"])
        except KeyError:
            args = None
        if args is not None and assoc_layer_ok(input, self.num_channels, self.num_groups, *args,
                                               self.eps):
            return run_layer("assoc", input, None, None, False, 0.0, self.eps, self.num_groups,
                             args, None, relu)
        args = (self.encoder, self.decoder_mean, self.decoder_var, self.weight, self.bias)
        F.check_assoc(input, self.num_groups, *args, self.eps, type(self).__name__,
                      self.num_channels)
        return run_layer("assoc", input, None, None, False, 0.0, self.eps, self.num_groups, args,
                         None, relu)


def ilm_embed_size(key_groups: int, reduction: int) -> int:
    """The authors' embedding size E of ILM-Norm's meta network (``ilm_gn``): ``K // reduction``
    when there are at least ``reduction`` key groups, else 2."""
    return key_groups // reduction if key_groups >= reduction else 2


# The authors' state_dict keys (``ilm_gn``) -> ours.  Their shared embedding layer appears under
# three names (it is a submodule of fc_weight and fc_bias too): all load into ``encoder``.
_ILM_AUTHORS_KEYS = {
    "weight_bias": "weight", "bias_bias": "bias",
    "fc_embed.0.weight": "encoder", "fc_weight.0.0.weight": "encoder",
    "fc_bias.0.0.weight": "encoder",
    "fc_weight.1.weight": "decoder_weight", "fc_bias.1.weight": "decoder_bias",
}


class ILMNorm(_NotScriptable, _Activation, nn.Module):
    """Instance-Level Meta Normalization (Jia, Chen & Chen, CVPR 2019), the authors' ``ilm_gn``
    layer: GroupNorm with ``num_groups`` groups and unbiased variances, whose per-sample weight
    and bias are predicted by a meta network from the means and unbiased variances of
    ``C // key_group_size`` key groups:

        omega = sigmoid(decoder_weight @ relu(encoder @ key_var))[key(c)] + weight[c]
        beta  = tanh(decoder_bias @ relu(encoder @ key_mean))[key(c)] + bias[c]
        y = (x - mu_G) / sqrt(var_G + eps) * omega + beta

    Arguments in the authors' order.  Parameters: ``encoder (E, K)`` (their ``fc_embed``,
    shared), ``decoder_weight``, ``decoder_bias (K, E)`` (``fc_weight.1``, ``fc_bias.1``),
    ``weight``, ``bias (C,)`` (``weight_bias``, ``bias_bias``), with ``K = C // key_group_size``
    and ``E = K // reduction`` (2 when ``K < reduction``); initialised as the authors' layer
    (``nn.Linear`` weights, ones, zeros), whose checkpoints load (``load_state_dict``).
    Input ``(N, C, *)`` like ``nn.GroupNorm``; train and eval behave the same.  docs/layers.md
    says how it differs from AssocNorm.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, key_group_size: int = 16,
                 reduction: int = 16, eps: float = 1e-5, device=None, dtype=None, *,
                 activation: str | None = None):
        super().__init__()
        self._set_activation(activation)
        num_channels, num_groups, key_group_size, reduction = (
            _positive_index(name, value) for name, value in (
                ("num_channels", num_channels), ("num_groups", num_groups),
                ("key_group_size", key_group_size), ("reduction", reduction)))
        for name, value in (("num_groups", num_groups), ("key_group_size", key_group_size)):
            if num_channels % value:
                raise ValueError(f"num_channels ({num_channels}) must be divisible by {name} "
                                 f"({value})")
        factory = {"device": device, "dtype": dtype}
        self.num_channels, self.num_groups, self.key_group_size, self.reduction, self.eps = (
            num_channels, num_groups, key_group_size, reduction, eps)
        self.key_groups = num_channels // key_group_size
        self.embed_size = ilm_embed_size(self.key_groups, reduction)
        k, e = self.key_groups, self.embed_size
        _meta_network_parameters(self, ("decoder_weight", "decoder_bias"), k, e, num_channels,
                                 factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the authors' layer: nn.Linear's initialisation, drawn in their order.
        for p in (self.encoder, self.decoder_weight, self.decoder_bias):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, num_groups={self.num_groups}, "
                f"key_group_size={self.key_group_size}, reduction={self.reduction}, "
                f"eps={self.eps}{self._activation_repr()}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The authors' checkpoints: their names, weight_bias / bias_bias of shape (1, C, 1, 1).
        shared = {}
        for theirs, ours in _ILM_AUTHORS_KEYS.items():
            if prefix + theirs not in state_dict:
                continue
            value = state_dict.pop(prefix + theirs)
            if ours in ("weight", "bias") and value.dim() == 4:
                value = value.reshape(-1)
            if ours == "encoder":
                shared[theirs] = value
            state_dict[prefix + ours] = value
        if shared:
            first_name, first = next(iter(shared.items()))
            for name, value in shared.items():
                if value.shape != first.shape or not torch.equal(value, first):
                    error_msgs.append(
                        f"{type(self).__name__}: the authors' shared embedding is stored as "
                        f"{', '.join(prefix + n for n in shared)}, which must be equal; "
                        f"{prefix + name} differs from {prefix + first_name}")
                    return
            state_dict[prefix + "encoder"] = first
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input):
        step = one_call_step(2)
        if step is not None:  # the common path as one C call (csrc/python_layer_step.cpp)
            y = step(input, self._parameters, self.num_channels, self.num_groups,
                     self.key_group_size, self.eps, self.activation,
                     ilm_devices(compiled_devices()))
            if y is not NotImplemented:
                return y
        if isinstance(input, Proxy):
            return _fx_leaf(self, input)
        relu = self._relu()
        args = (self.encoder, self.decoder_weight, self.decoder_bias, self.weight, self.bias)
        if not ilm_layer_ok(input, self.num_channels, self.num_groups, self.key_group_size,
                            *args, self.eps):  # the common path skips the checks (_checks.py)
            F.check_ilm(input, self.num_groups, self.key_group_size, *args, self.eps,
                        type(self).__name__, self.num_channels)
        return run_layer("ilm", input, None, None, False, 0.0, self.eps, self.num_groups, args,
                         None, relu)
