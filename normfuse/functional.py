"""Functional forms of the layers (like ``torch.nn.functional.batch_norm``).

``running_mean``/``running_var`` are updated in place when ``training`` is true and they are
given; with ``training=False`` they supply the batch part (eval mode), and when they are None
the batch statistics are used in either mode, as in ``nn.BatchNorm`` with
``track_running_stats=False``.  ``momentum`` is the factor of the exponential average.
"""
from __future__ import annotations

import math
import numbers

from torch import Tensor
from torch.fx import Proxy

from ._autograd import run_layer
from ._checks import (assoc_layer_ok, batch_layer_ok, check_batch_counter, check_batch_values,
                      check_channels, check_group_values, check_input,
                      check_not_saved_inference, check_number, check_running_stats,
                      check_running_writable, check_tensor, ilm_layer_ok, relu_flag)

_RANKS = (2, 3, 4, 5)


def _fx_node(fn, args: tuple, kwargs: dict):
    """Under ``torch.fx.symbolic_trace`` (an argument is a Proxy): ``fn`` as one
    ``call_function`` node, which the GraphModule calls with real tensors; None when no argument
    is a Proxy.  Tracing into it would fail: its checks and ops need real tensors.  Every
    layer calls it only off the common path (a Proxy fails the fast predicates)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Proxy):
            return value.tracer.create_proxy("call_function", fn, args, kwargs)
    return None


def check_batch_layer(who, input, running_mean, running_var, named_params, training,
                      momentum, eps, num_batches_tracked=None, ranks=_RANKS, channels=None,
                      values=True):
    """Every check of a BIN / IEBN call, in the documented order (one pass: modules call it
    with their ``ranks`` and ``channels`` instead of checking the input first themselves).
    An empty input passes, as in ``nn.BatchNorm``: ``run_layer`` gives it an empty output.
    ``values=False``: a synchronized layer's rank, whose batch statistics span the group (one
    value per channel here is no error; the merge checks the whole batch)."""
    check_input(input, who, ranks, empty="any")
    if channels is not None:
        check_channels(input, channels, who)
    channels = input.shape[1]
    for name, tensor, optional in named_params:
        check_tensor(tensor, name, (channels,), input, who, optional=optional)
    check_running_stats(running_mean, running_var, channels, input, who)
    if training:
        check_running_writable(running_mean, running_var, named_params, who, input)
    check_batch_counter(num_batches_tracked, input, who)
    params = [(name, t) for name, t, _ in named_params]
    check_not_saved_inference(
        [("input", input), *params, ("running_mean", running_mean), ("running_var", running_var)],
        [input, *(t for _, t in params)], who)
    check_number(momentum, "momentum", who, low=-math.inf)  # any finite one, as nn.BatchNorm
    check_number(eps, "eps", who)
    if values and (training or running_mean is None):
        check_batch_values(input, who, training)


def batch_instance_norm(input: Tensor, running_mean, running_var, weight, bias, gate: Tensor,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                        activation: str | None = None) -> Tensor:
    """Batch-Instance Normalization: ``(gate * xhat_B + (1 - gate) * xhat_I) * weight + bias``.

    ``weight``/``bias`` may be None (no affine); ``gate`` (rho) is required, shape ``(C,)``.
    ``activation="relu"``: ``relu`` of that, in the same kernel (the fused activation).
    """
    who = "batch_instance_norm"
    relu = relu_flag(activation, who)
    if not batch_layer_ok(input, _RANKS, None, training or running_mean is None, (gate,),
                          (weight, bias), running_mean, running_var, None, momentum, eps):
        node = _fx_node(batch_instance_norm, (input, running_mean, running_var, weight, bias,
                                              gate),
                        dict(training=training, momentum=momentum, eps=eps,
                             activation=activation))
        if node is not None:
            return node
        check_batch_layer(who, input, running_mean, running_var,
                          [("gate", gate, False), ("weight", weight, True), ("bias", bias, True)],
                          training, momentum, eps)
    return run_layer("bin", input, running_mean, running_var, training, momentum, eps, 0,
                     (gate, weight, bias), None, relu, who=who)


def instance_enhancement_batch_norm(input: Tensor, running_mean, running_var, weight, bias,
                                    gate_weight: Tensor, gate_bias: Tensor,
                                    training: bool = False, momentum: float = 0.1,
                                    eps: float = 1e-5, activation: str | None = None) -> Tensor:
    """IEBN: ``xhat_B * weight * sigmoid(mean_hw(x) * gate_weight + gate_bias) + bias``
    (``activation="relu"``: its ``relu``, fused)."""
    who = "instance_enhancement_batch_norm"
    relu = relu_flag(activation, who)
    if not batch_layer_ok(input, _RANKS, None, training or running_mean is None,
                          (gate_weight, gate_bias), (weight, bias), running_mean, running_var,
                          None, momentum, eps):
        node = _fx_node(instance_enhancement_batch_norm,
                        (input, running_mean, running_var, weight, bias, gate_weight, gate_bias),
                        dict(training=training, momentum=momentum, eps=eps,
                             activation=activation))
        if node is not None:
            return node
        check_batch_layer(who, input, running_mean, running_var,
                          [("gate_weight", gate_weight, False), ("gate_bias", gate_bias, False),
                           ("weight", weight, True), ("bias", bias, True)],
                          training, momentum, eps)
    return run_layer("iebn", input, running_mean, running_var, training, momentum, eps, 0,
                     (gate_weight, gate_bias, weight, bias), None, relu, who=who)


def assoc_norm(input: Tensor, num_groups: int, encoder: Tensor, decoder_mean: Tensor,
               decoder_var: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
               activation: str | None = None) -> Tensor:
    """Associate Normalization: GroupNorm whose per-sample scale and shift come from an
    auto-encoder of the group means and variances (see ``normfuse.AssocNorm``);
    ``activation="relu"``: its ``relu``, fused."""
    relu = relu_flag(activation, "assoc_norm")
    if not assoc_layer_ok(input, None, num_groups, encoder, decoder_mean, decoder_var, weight,
                          bias, eps):
        node = _fx_node(assoc_norm, (input, num_groups, encoder, decoder_mean, decoder_var,
                                     weight, bias), dict(eps=eps, activation=activation))
        if node is not None:
            return node
        check_assoc(input, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps)
    return run_layer("assoc", input, None, None, False, 0.0, eps, num_groups,
                     (encoder, decoder_mean, decoder_var, weight, bias), None, relu)


def check_assoc(input, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps,
                who="assoc_norm", channels=None):
    """Every check of an AssocNorm call (``channels``: the module's ``num_channels``); zero
    samples pass, as in ``nn.GroupNorm``."""
    check_input(input, who, empty="batch")
    if channels is not None:
        check_channels(input, channels, who, "num_channels")
    channels = input.shape[1]
    _check_positive_int(num_groups, "num_groups", who)
    if channels % num_groups:
        raise ValueError(f"{who}: the input's channel count ({channels}) must be divisible by "
                         f"num_groups ({num_groups})")
    _check_meta_network(who, input, encoder, "embed_dim", ("num_groups", num_groups),
                        (("decoder_mean", decoder_mean), ("decoder_var", decoder_var)), weight,
                        bias, eps)


def _check_meta_network(who, input, encoder, embed_name, columns, decoders, weight, bias, eps):
    """The parameters of AssocNorm's and ILM-Norm's meta networks: ``encoder (E, K)`` with
    ``columns = (name of K, K)``, each decoder ``(K, E)``, ``weight`` and ``bias (C,)``, eps."""
    column_name, k = columns
    if not hasattr(encoder, "dim") or encoder.dim() != 2:
        raise ValueError(f"{who}: encoder must be a 2-d tensor of shape ({embed_name}, "
                         f"{column_name}={k}), got {getattr(encoder, 'shape', encoder)}")
    embed = encoder.shape[0]
    if embed == 0:
        raise ValueError(f"{who}: encoder must have at least one row ({embed_name} >= 1), got "
                         f"shape {tuple(encoder.shape)}")
    check_tensor(encoder, "encoder", (embed, k), input, who)
    for name, decoder in decoders:
        check_tensor(decoder, name, (k, embed), input, who)
    channels = input.shape[1]
    check_tensor(weight, "weight", (channels,), input, who)
    check_tensor(bias, "bias", (channels,), input, who)
    params = [("encoder", encoder), *decoders, ("weight", weight), ("bias", bias)]
    check_not_saved_inference([("input", input), *params], [input, *(t for _, t in params)],
                              who)
    check_number(eps, "eps", who)


def _check_positive_int(value, name: str, who: str) -> None:
    """A positive int: a Python int or a NumPy integer (as the modules take), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        # (np.bool_ is no numbers.Integral)
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")


def ilm_norm(input: Tensor, num_groups: int, key_group_size: int, encoder: Tensor,
             decoder_weight: Tensor, decoder_bias: Tensor, weight: Tensor, bias: Tensor,
             eps: float = 1e-5, activation: str | None = None) -> Tensor:
    """Instance-Level Meta Normalization (see ``normfuse.ILMNorm``): GroupNorm with ``num_groups``
    groups and unbiased variances, whose per-sample weight and bias come from a meta network of
    the means and unbiased variances of key groups of ``key_group_size`` channels:
    ``encoder (E, K)``, ``decoder_weight``, ``decoder_bias (K, E)`` with ``K = C //
    key_group_size``; ``weight``, ``bias`` ``(C,)`` (the authors' ``weight_bias``,
    ``bias_bias``).  ``activation="relu"``: its ``relu``, fused."""
    relu = relu_flag(activation, "ilm_norm")
    if not ilm_layer_ok(input, None, num_groups, key_group_size, encoder, decoder_weight,
                        decoder_bias, weight, bias, eps):
        node = _fx_node(ilm_norm, (input, num_groups, key_group_size, encoder, decoder_weight,
                                   decoder_bias, weight, bias),
                        dict(eps=eps, activation=activation))
        if node is not None:
            return node
        check_ilm(input, num_groups, key_group_size, encoder, decoder_weight, decoder_bias,
                  weight, bias, eps)
    # The key-group count travels as the encoder's column count.
    return run_layer("ilm", input, None, None, False, 0.0, eps, num_groups,
                     (encoder, decoder_weight, decoder_bias, weight, bias), None, relu)


def check_ilm(input, num_groups, key_group_size, encoder, decoder_weight, decoder_bias, weight,
              bias, eps, who="ilm_norm", channels=None):
    """Every check of an ILM-Norm call (``channels``: the module's ``num_channels``); zero
    samples pass, as in ``nn.GroupNorm``."""
    check_input(input, who, empty="batch")
    if channels is not None:
        check_channels(input, channels, who, "num_channels")
    channels = input.shape[1]
    _check_positive_int(num_groups, "num_groups", who)
    _check_positive_int(key_group_size, "key_group_size", who)
    if channels % num_groups:
        raise ValueError(f"{who}: the input's channel count ({channels}) must be divisible by "
                         f"num_groups ({num_groups})")
    if channels % key_group_size:
        raise ValueError(f"{who}: the input's channel count ({channels}) must be divisible by "
                         f"key_group_size ({key_group_size})")
    check_group_values(input, who, channels // num_groups, "group", f"num_groups={num_groups}")
    check_group_values(input, who, key_group_size, "key group",
                       f"key_group_size={key_group_size}")
    _check_meta_network(who, input, encoder, "embed_size",
                        ("key_groups", channels // key_group_size),
                        (("decoder_weight", decoder_weight), ("decoder_bias", decoder_bias)),
                        weight, bias, eps)
