"""torch.fx symbolic tracing of models that hold normfuse layers (issue: drop-in for
nn.BatchNorm2d / nn.GroupNorm, which fx's default tracer keeps as leaves).

Every module (BIN, IEBN 1d/2d/3d, AssocNorm, ILMNorm, the Sync variants, with and without the
fused ReLU) traces as one ``call_module`` node; tracing runs nothing (running statistics and
``num_batches_tracked`` untouched); the traced GraphModule computes what the model computes,
forward and backward, in training (running statistics updated alike) and eval.  fx tools built
on the tracer (torchvision's create_feature_extractor, FX quantization) rely on exactly this.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

SHAPES = {1: (4, 6, 5), 2: (3, 6, 5, 4), 3: (2, 6, 3, 4, 2)}


def _layers(nf):
    out = []
    for d in (1, 2, 3):
        out += [(d, getattr(nf, f"BatchInstanceNorm{d}d")(6)),
                (d, getattr(nf, f"InstanceEnhancementBatchNorm{d}d")(6, activation="relu"))]
    out += [(2, nf.AssocNorm(3, 6)), (2, nf.AssocNorm(2, 6, activation="relu")),
            (2, nf.ILMNorm(6, num_groups=3, key_group_size=2)),
            (2, nf.SyncBatchInstanceNorm(6)), (3, nf.SyncInstanceEnhancementBatchNorm(6))]
    return out


def _model(d, norm, seed):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
    torch.manual_seed(seed)
    model = nn.Sequential(conv(6, 6, 1), norm, nn.ReLU(), conv(6, 6, 1))
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _assert_same_step(gm, reference, shape):
    """``gm`` and ``reference`` on the same random input: outputs and the gradients of the input
    and of every parameter bitwise equal."""
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = gm(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *gm.parameters()], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *reference.parameters()], dy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("index", range(11))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace_keeps_the_layer_a_leaf(nf, seed, index, training):
    layers = _layers(nf)
    assert len(layers) == 11
    d, norm = layers[index]
    model = _model(d, norm, seed).train(training)
    before = _state(model)
    gm = torch.fx.symbolic_trace(model)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # tracing ran nothing
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["0", "1", "2", "3"]
    assert gm.get_submodule("1") is norm

    reference = copy.deepcopy(model)
    _assert_same_step(gm, reference, SHAPES[d])
    state, state_ref = gm.state_dict(), reference.state_dict()
    assert state.keys() == state_ref.keys()
    for k in state:
        torch.testing.assert_close(state[k], state_ref[k], rtol=0, atol=0)
    if training and hasattr(norm, "running_mean"):
        assert not torch.equal(norm.running_mean, before["1.running_mean"])  # it did train


def test_a_tracer_that_traces_into_leaves_still_sees_one_node(nf):
    """A custom Tracer (as torchvision's feature extractor) that asks is_leaf_module gets the
    same graph: the layer decides for itself, whatever the tracer's leaf rule."""
    class Everything(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return False

    model = nn.Sequential(nn.Conv2d(3, 6, 1), nf.BatchInstanceNorm2d(6))
    graph = Everything().trace(model)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "1" in targets


def test_the_layer_itself_as_root_is_a_clear_error(nf):
    for layer in (nf.BatchInstanceNorm2d(4), nf.AssocNorm(2, 4),
                  nf.ILMNorm(4, num_groups=2, key_group_size=2), nf.SyncBatchInstanceNorm(4)):
        with pytest.raises(torch.fx.proxy.TraceError,
                           match=rf"{type(layer).__name__}: torch.fx cannot trace a normfuse "
                                 r"layer as the root module .* nn.Sequential\(layer\)"):
            torch.fx.symbolic_trace(layer)


class _Functional(nn.Module):
    """A model that calls every functional form (parameters and buffers of its own), one of
    them through a from-import (which fx.wrap could not have patched)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 1)
        for name in ("weight", "bias", "gate", "gate_weight", "gate_bias"):
            self.register_parameter(name, nn.Parameter(torch.randn(6) * 0.5 + 0.5))
        self.encoder = nn.Parameter(torch.randn(2, 3))
        self.decoder_a = nn.Parameter(torch.randn(3, 2) * 0.3)
        self.decoder_b = nn.Parameter(torch.randn(3, 2) * 0.3)
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))

    def forward(self, x):
        import normfuse.functional as F
        from normfuse.functional import instance_enhancement_batch_norm as iebn
        x = self.conv(x)
        x = F.batch_instance_norm(x, self.running_mean, self.running_var, self.weight,
                                  self.bias, self.gate, training=self.training)
        x = iebn(x, None, None, self.weight, None, self.gate_weight, self.gate_bias,
                 training=True, activation="relu")
        x = F.assoc_norm(x, 3, self.encoder, self.decoder_a, self.decoder_b, self.weight,
                         self.bias)
        return F.ilm_norm(x, 2, 2, self.encoder, self.decoder_a, self.decoder_b, self.weight,
                          self.bias, eps=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_forms_trace_as_one_call_function_node_each(nf, seed, training):
    """A model calling the functional forms traces: each call is one call_function node (the
    function itself), tracing runs nothing, and the GraphModule computes what the model does:
    outputs, gradients and running statistics bitwise."""
    model = _Functional().train(training)
    before = _state(model)
    gm = torch.fx.symbolic_trace(model)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    F = nf.functional
    called = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert called == [F.batch_instance_norm, F.instance_enhancement_batch_norm, F.assoc_norm,
                      F.ilm_norm]
    reference = copy.deepcopy(model)
    _assert_same_step(gm, reference, (3, 6, 5, 4))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(gm, name), getattr(reference, name), rtol=0, atol=0)
    assert torch.equal(gm.running_mean, before["running_mean"]) != training  # it did train
