"""The error contract of the README (section "Error contract"), row by row, on every backend.

Each row of that table has an id; ``ROWS`` below holds, per id, the bad call
(built fresh for each test) and the key words its message must contain (the argument name
first).  For every row and backend the test asserts:

* the exception type and message are the ones the table documents (the table's message, with
  ``…`` standing for machine-dependent text, must match the raised message exactly);
* the message names the argument (key words);
* nothing was computed: the autograd function that runs the kernels was never entered;
* running_mean, running_var and num_batches_tracked are bitwise unchanged.

Inputs that every backend must accept (or refuse) alike are listed in docs/errors.md, section 2,
and tested by ``test_backend_consistency`` below.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oracles import make_input, randomize_parameters

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"  # the table of section "Error contract"
C = 4
SHAPE = (3, C, 2, 3)


# ------------------------------------------------------------------------------ row builders
def _bin(nf, device, **kw):
    return randomize_parameters(nf.BatchInstanceNorm2d(C, **kw), 11).to(device).train()


def _iebn(nf, device, **kw):
    return randomize_parameters(nf.IEBN2d(C, **kw), 12).to(device).train()


def _assoc(nf, device):
    return randomize_parameters(nf.AssocNorm(2, C), 13).to(device).train()


def _ilm(nf, device, groups=2, key_group_size=2):
    m = nf.ILMNorm(C, num_groups=groups, key_group_size=key_group_size)
    return randomize_parameters(m, 14).to(device).train()


def _x(device, shape=SHAPE, dtype=torch.float32):
    return make_input(shape, 5, dtype, device)


def _fargs(device, c=C):
    """Functional BIN arguments (running stats included)."""
    f = dict(device=device)
    return dict(running_mean=torch.full((c,), 0.25, **f), running_var=torch.full((c,), 1.5, **f),
                weight=torch.full((c,), 1.2, **f), bias=torch.full((c,), 0.1, **f),
                gate=torch.full((c,), 0.6, **f))


def _fbin(nf, x, a, training=True, **kw):
    return nf.functional.batch_instance_norm(x, a["running_mean"], a["running_var"], a["weight"],
                                             a["bias"], a["gate"], training=training, **kw)


def _assoc_args(device, c=C, g=2, m=1):
    f = dict(device=device)
    return dict(encoder=torch.full((m, g), 0.3, **f), decoder_mean=torch.full((g, m), 0.2, **f),
                decoder_var=torch.full((g, m), -0.2, **f), weight=torch.ones(c, **f),
                bias=torch.zeros(c, **f))


def _fassoc(nf, x, g, a):
    return nf.functional.assoc_norm(x, g, a["encoder"], a["decoder_mean"], a["decoder_var"],
                                    a["weight"], a["bias"])


def _ilm_args(device, c=C, key_groups=2, e=2):
    f = dict(device=device)
    return dict(encoder=torch.full((e, key_groups), 0.3, **f),
                decoder_weight=torch.full((key_groups, e), 0.2, **f),
                decoder_bias=torch.full((key_groups, e), -0.2, **f), weight=torch.ones(c, **f),
                bias=torch.zeros(c, **f))


def _film(nf, x, g, k, a):
    return nf.functional.ilm_norm(x, g, k, a["encoder"], a["decoder_weight"], a["decoder_bias"],
                                  a["weight"], a["bias"])


def _fbin_with(nf, device, **bad):
    """The functional BIN call of ``_fargs`` with the row's bad argument(s) in place."""
    a = {**_fargs(device), **bad}
    return (lambda: _fbin(nf, _x(device), a)), a


def _on_meta(m, name):
    """``m`` with its parameter or buffer ``name`` moved to the meta device."""
    t = getattr(m, name)
    setattr(m, name, torch.nn.Parameter(t.detach().to("meta"))
            if isinstance(t, torch.nn.Parameter) else t.to("meta"))
    return m


def _replace_param(m, name, value):
    """Put a plain tensor (e.g. an integer one, which cannot be a Parameter) in place of
    parameter ``name``."""
    delattr(m, name)
    setattr(m, name, value)
    return m


def _row_wrong_rank(nf, device):
    m = _bin(nf, device)
    return (lambda: m(_x(device, (3, C, 5)))), m


def _row_wrong_rank_functional(nf, device):
    a = _fargs(device)
    return (lambda: _fbin(nf, torch.randn(C, device=device), a)), a


def _row_wrong_rank_6d(nf, device):
    a = _fargs(device)
    return (lambda: _fbin(nf, torch.randn(2, C, 2, 2, 2, 2, device=device), a)), a


def _row_wrong_channels(nf, device):
    m = _iebn(nf, device)
    return (lambda: m(_x(device, (3, C + 1, 2, 3)))), m


def _row_wrong_channels_assoc(nf, device):
    m = _assoc(nf, device)
    return (lambda: m(_x(device, (3, 6, 2, 3)))), m


def _row_groups_module(nf, device):
    return (lambda: nf.AssocNorm(3, C)), None


def _row_groups_functional(nf, device):
    a = _assoc_args(device, g=3)
    return (lambda: _fassoc(nf, _x(device), 3, a)), a


def _row_groups_not_int(nf, device):
    a = _assoc_args(device)
    return (lambda: _fassoc(nf, _x(device), 2.0, a)), a


def _row_wrong_channels_ilm(nf, device):
    m = _ilm(nf, device)
    return (lambda: m(_x(device, (3, 6, 2, 3)))), m


def _row_key_groups_module(nf, device):
    return (lambda: nf.ILMNorm(C, num_groups=2, key_group_size=3)), None


def _row_key_groups_functional(nf, device):
    a = _ilm_args(device)
    return (lambda: _film(nf, _x(device), 2, 3, a)), a


def _row_group_values_ilm(nf, device):
    m = _ilm(nf, device, groups=4)
    return (lambda: m(_x(device, (3, C)))), m


def _row_key_group_values_ilm(nf, device):
    m = _ilm(nf, device, key_group_size=1)
    return (lambda: m(_x(device, (3, C, 1)))), m


def _row_param_meta(nf, device):
    m = _on_meta(_bin(nf, device), "weight")
    return (lambda: m(_x(device))), m


def _row_buffer_meta(nf, device):
    m = _on_meta(_iebn(nf, device), "running_var")
    return (lambda: m(_x(device))), m


def _row_assoc_param_meta(nf, device):
    m = _on_meta(_assoc(nf, device), "encoder")
    return (lambda: m(_x(device))), m


def _row_input_meta(nf, device):
    m = _bin(nf, device)
    return (lambda: m(_x(device).to("meta"))), m


def _row_param_int(nf, device):
    m = _replace_param(_bin(nf, device), "gate", torch.ones(C, dtype=torch.int64, device=device))
    return (lambda: m(_x(device))), m


def _row_param_sparse(nf, device):
    m = _replace_param(_bin(nf, device), "gate", torch.ones(C, device=device).to_sparse())
    return (lambda: m(_x(device))), m


def _row_buffer_int(nf, device):
    return _fbin_with(nf, device, running_var=torch.ones(C, dtype=torch.int32, device=device))


def _row_param_shape(nf, device):
    return _fbin_with(nf, device, bias=torch.zeros(1, C, 1, 1, device=device))


def _row_param_none(nf, device):
    return _fbin_with(nf, device, gate=None)


def _row_param_not_tensor(nf, device):
    return _fbin_with(nf, device, gate=[1.0] * C)


def _row_encoder_rank(nf, device):
    a = _assoc_args(device)
    a["encoder"] = torch.ones(2, device=device)
    return (lambda: _fassoc(nf, _x(device), 2, a)), a


def _row_encoder_empty(nf, device):
    a = _assoc_args(device, m=1)
    a["encoder"] = torch.ones(0, 2, device=device)
    a["decoder_mean"] = a["decoder_var"] = torch.ones(2, 0, device=device)
    return (lambda: _fassoc(nf, _x(device), 2, a)), a


def _row_running_mean_only(nf, device):
    return _fbin_with(nf, device, running_var=None)


def _row_running_expanded(nf, device):
    return _fbin_with(nf, device, running_mean=torch.zeros(1, device=device).expand(C))


def _row_running_alias(nf, device):
    a = _fargs(device)
    a["running_var"] = a["running_mean"]
    return (lambda: _fbin(nf, _x(device), a)), a


def _row_running_grad(nf, device):
    return _fbin_with(nf, device, running_mean=torch.zeros(C, device=device).requires_grad_())


def _row_running_alias_input(nf, device):
    x = _x(device)
    a = {**_fargs(device), "running_mean": x.view(-1)[:C]}  # updating it would change x
    return (lambda: _fbin(nf, x, a)), a


def _row_inference_input(nf, device):
    m = _bin(nf, device)
    with torch.inference_mode():
        x = _x(device)
    return (lambda: m(x)), m  # autograd would have to save x (m's parameters require grad)


def _row_inference_running(nf, device):
    m = _bin(nf, device)
    with torch.inference_mode():  # e.g. a module built or loaded under inference mode
        m.running_var = torch.full((C,), 1.5, device=device)
    return (lambda: m(_x(device))), m


def _row_counter_dtype(nf, device):
    m = _bin(nf, device)
    m.num_batches_tracked = torch.tensor(2.0, device=device)  # the op increments it in place
    return (lambda: m(_x(device))), m


def _row_single_value(nf, device):
    m = _bin(nf, device, momentum=None)
    m(_x(device))  # num_batches_tracked = 1: the failing call must not count
    return (lambda: m(_x(device, (1, C, 1, 1)))), m


def _row_single_value_untracked_eval(nf, device):
    m = _iebn(nf, device, track_running_stats=False).eval()
    return (lambda: m(_x(device, (1, C, 1, 1)))), m


def _row_empty_spatial(nf, device):
    m = _assoc(nf, device)
    return (lambda: m(torch.empty(2, C, 0, device=device))), m


def _row_sparse(nf, device):
    m = _bin(nf, device)
    return (lambda: m(_x(device).to_sparse())), m


def _row_mkldnn(nf, device):
    if not torch.backends.mkldnn.is_available() or device != "cpu":
        pytest.skip("mkldnn tensors need a CPU build with oneDNN")
    m = _bin(nf, device)
    return (lambda: m(_x(device).to_mkldnn())), m


def _row_nested(nf, device):
    m = _bin(nf, device)
    x = torch.nested.nested_tensor([torch.randn(C, 3, 4), torch.randn(C, 3, 5)], device=device)
    return (lambda: m(x)), m


def _row_int_input(nf, device):
    m = _iebn(nf, device)
    return (lambda: m((_x(device) * 4).to(torch.int64))), m


def _row_complex_input(nf, device):
    a = _fargs(device)
    return (lambda: _fbin(nf, _x(device).to(torch.complex64), a)), a


def _row_not_a_tensor(nf, device):
    m = _bin(nf, device)
    return (lambda: m(_x(device).tolist())), m


def _row_momentum(nf, device):
    a = _fargs(device)
    return (lambda: _fbin(nf, _x(device), a, momentum=float("nan"))), a


def _row_eps(nf, device):
    m = _bin(nf, device, eps=-1e-5)
    return (lambda: m(_x(device))), m


def _row_num_features(nf, device):
    return (lambda: nf.BatchInstanceNorm2d(0)), None


def _row_embed_dim(nf, device):
    return (lambda: nf.AssocNorm(2, C, embed_dim=0)), None


def _row_unknown_backend(nf, device):
    m = _bin(nf, device)

    def call():
        with nf.use_backend("fused"):
            m(_x(device))
    return call, m


def _row_unavailable_backend(nf, device):
    missing = [b for b in ("cuda", "triton", "cpu") if b not in nf.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    m = _bin(nf, device)

    def call():
        nf.set_backend(missing[0])  # raises; the setting stays what it was
        m(_x(device))
    return call, m


def _row_backend_device(nf, device):
    """An explicit backend and an input it cannot run on: 'cpu'/'triton' get a meta tensor
    (standing in for a GPU one on a CPU-only machine), 'cuda' a CPU tensor."""
    name = nf.get_backend()
    if name in ("torch", "auto"):
        pytest.skip("the torch backend runs on any device")
    where = "cpu" if name == "cuda" else "meta"
    a = _fargs(where)
    return (lambda: _fbin(nf, _x("cpu").to(where), a)), a


# id -> (builder, exception type, key words: the argument first)
ROWS = {
    "rank": (_row_wrong_rank, ValueError, ["input", "rank", "4-d"]),
    "rank-functional": (_row_wrong_rank_functional, ValueError, ["input", "rank", "1-d"]),
    "rank-6d": (_row_wrong_rank_6d, ValueError, ["input", "rank", "6-d"]),
    "channels": (_row_wrong_channels, ValueError, ["num_features", "channels", "dim 1"]),
    "channels-assoc": (_row_wrong_channels_assoc, ValueError, ["num_channels", "channels"]),
    "groups-module": (_row_groups_module, ValueError, ["num_groups", "num_channels",
                                                       "divisible"]),
    "groups-functional": (_row_groups_functional, ValueError, ["num_groups", "divisible"]),
    "groups-type": (_row_groups_not_int, ValueError, ["num_groups", "positive int"]),
    "channels-ilm": (_row_wrong_channels_ilm, ValueError, ["num_channels", "channels"]),
    "key-groups-module": (_row_key_groups_module, ValueError, ["key_group_size", "num_channels",
                                                               "divisible"]),
    "key-groups-functional": (_row_key_groups_functional, ValueError, ["key_group_size",
                                                                       "divisible"]),
    "group-values-ilm": (_row_group_values_ilm, ValueError, ["input", "more than 1 value per "
                                                             "group", "num_groups"]),
    "key-group-values-ilm": (_row_key_group_values_ilm, ValueError,
                             ["input", "more than 1 value per key group", "key_group_size"]),
    "param-device": (_row_param_meta, ValueError, ["weight", "device", "meta"]),
    "buffer-device": (_row_buffer_meta, ValueError, ["running_var", "device", "meta"]),
    "assoc-param-device": (_row_assoc_param_meta, ValueError, ["encoder", "device", "meta"]),
    "input-device": (_row_input_meta, ValueError, ["gate", "device", "meta"]),
    "param-dtype": (_row_param_int, ValueError, ["gate", "floating-point", "int64"]),
    "buffer-dtype": (_row_buffer_int, ValueError, ["running_var", "floating-point", "int32"]),
    "param-layout": (_row_param_sparse, ValueError, ["gate", "dense", "sparse_coo"]),
    "param-shape": (_row_param_shape, ValueError, ["bias", "shape"]),
    "param-none": (_row_param_none, ValueError, ["gate", "None"]),
    "param-type": (_row_param_not_tensor, TypeError, ["gate", "torch.Tensor", "list"]),
    "encoder-rank": (_row_encoder_rank, ValueError, ["encoder", "2-d"]),
    "encoder-empty": (_row_encoder_empty, ValueError, ["encoder", "embed_dim >= 1"]),
    "running-pair": (_row_running_mean_only, ValueError, ["running_mean", "running_var"]),
    "running-overlap": (_row_running_expanded, ValueError, ["running_mean", "overlapping"]),
    "running-alias": (_row_running_alias, ValueError, ["running_mean", "running_var",
                                                       "share memory"]),
    "running-alias-input": (_row_running_alias_input, ValueError, ["running_mean", "input",
                                                                   "share memory"]),
    "running-grad": (_row_running_grad, ValueError, ["running_mean", "require grad"]),
    "inference-input": (_row_inference_input, ValueError, ["input", "inference tensor",
                                                           "torch.no_grad()"]),
    "inference-running": (_row_inference_running, ValueError, ["running_var", "inference tensor",
                                                               "clone"]),
    "counter-dtype": (_row_counter_dtype, ValueError, ["num_batches_tracked", "0-dim int64",
                                                       "float32"]),
    "single-value": (_row_single_value, ValueError, ["input", "more than 1 value per channel"]),
    "single-value-eval": (_row_single_value_untracked_eval, ValueError,
                          ["input", "more than 1 value per channel"]),
    "empty-spatial": (_row_empty_spatial, ValueError, ["input", "one element per sample"]),
    "sparse": (_row_sparse, ValueError, ["input", "dense", "sparse_coo"]),
    "mkldnn": (_row_mkldnn, ValueError, ["input", "dense", "mkldnn"]),
    "nested": (_row_nested, ValueError, ["input", "dense", "nested"]),
    "input-dtype": (_row_int_input, ValueError, ["input", "int64"]),
    "input-complex": (_row_complex_input, ValueError, ["input", "complex64"]),
    "input-type": (_row_not_a_tensor, TypeError, ["input", "torch.Tensor", "list"]),
    "momentum": (_row_momentum, ValueError, ["momentum", "finite"]),
    "eps": (_row_eps, ValueError, ["eps", ">="]),
    "num-features": (_row_num_features, ValueError, ["num_features", "positive"]),
    "embed-dim": (_row_embed_dim, ValueError, ["embed_dim", "positive"]),
    "backend-unknown": (_row_unknown_backend, ValueError, ["backend", "fused", "available"]),
    "backend-unavailable": (_row_unavailable_backend, RuntimeError,
                            ["backend", "cannot run here", "available"]),
    "backend-device": (_row_backend_device, RuntimeError, ["backend", "cannot run on",
                                                           "auto", "torch"]),
}


# ------------------------------------------------------------------------------ the doc table
def doc_rows() -> dict:
    """id -> (exception name, message template) from the error-contract table of the README."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") \
            else []
        if len(cells) < 5 or not re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            continue
        exc = cells[-2].strip("`")
        msg = cells[-1]
        assert msg.startswith("`") and msg.endswith("`"), f"message cell of {cells[0]} not code"
        rows[cells[0].strip("`")] = (exc, msg[1:-1].replace("\\|", "|"))
    return rows


def template_regex(template: str) -> str:
    """``…`` in a documented message stands for any text (machine-dependent parts)."""
    return ".*".join(re.escape(part) for part in template.split("…"))


def for_device(rid: str, template: str, device: str) -> str:
    """The README writes the device rows for a CPU input ("device cpu, got meta"); on another
    device (cuda:0 with a GPU backend) the message names that device instead."""
    return re.sub(r"\bcpu\b", device, template) if rid.endswith("-device") else template


def test_for_device_rewrites_only_device_rows():
    rows = doc_rows()
    assert for_device("param-device", rows["param-device"][1], "cuda:0").endswith(
        "weight must be on the input's device cuda:0, got meta")
    assert for_device("input-device", rows["input-device"][1], "cuda:0").endswith(
        "gate must be on the input's device meta, got cuda:0")
    assert for_device("rank", rows["rank"][1], "cuda:0") == rows["rank"][1]


def test_doc_table_lists_every_row():
    rows = doc_rows()
    assert set(rows) == set(ROWS), (f"README table and ROWS differ: only in the doc "
                                    f"{set(rows) - set(ROWS)}, only here {set(ROWS) - set(rows)}")
    for rid, (exc, _) in rows.items():
        assert exc == ROWS[rid][1].__name__, f"{rid}: doc says {exc}, test {ROWS[rid][1]}"


def _state(holder):
    """Everything a failing call must not change: module buffers or running-stat tensors."""
    if holder is None:
        return {}
    if isinstance(holder, torch.nn.Module):
        items = holder.named_buffers()
    else:
        items = ((k, v) for k, v in holder.items() if k.startswith("running"))
    return {k: v for k, v in items if isinstance(v, torch.Tensor)}


def _snapshot(state):
    return {k: (v, None if v.device.type == "meta" else v.detach().clone())
            for k, v in state.items()}


def _assert_unchanged(holder, snap, rid):
    now = _state(holder)
    assert set(now) == set(snap), f"{rid}: buffers added or removed"
    for k, (obj, before) in snap.items():
        assert now[k] is obj, f"{rid}: {k} was replaced"
        if before is not None:
            assert torch.equal(now[k], before), f"{rid}: {k} changed by a call that raised"


@pytest.fixture
def no_kernel_calls(nf, monkeypatch):
    """Counts entries into what runs the ops: the autograd function (every backend) and the
    whole-layer ops of the compiled backends (normfuse._autograd.run_fused)."""
    from normfuse import _autograd

    calls = []
    real, real_fused = _autograd.NormFunction.apply, _autograd.run_fused

    def spy(*args, **kwargs):
        calls.append(args[:2])
        return real(*args, **kwargs)

    def spy_fused(*args, **kwargs):
        calls.append(args[:2])
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(_autograd.NormFunction, "apply", spy)
    monkeypatch.setattr(_autograd, "run_fused", spy_fused)
    return calls


@pytest.mark.parametrize("rid", list(ROWS))
def test_error_contract_row(nf, backend, device, rid, no_kernel_calls):
    build, exc_type, words = ROWS[rid]
    documented = doc_rows()
    assert rid in documented, f"row {rid} missing from the README table"
    setting = nf.get_backend()
    call, holder = build(nf, device)
    snap = _snapshot(_state(holder))
    before_calls = len(no_kernel_calls)
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    msg = str(err)
    assert type(err) is exc_type, f"{rid}: raised {type(err).__name__}: {msg}"
    for w in words:
        assert w in msg, f"{rid}: message does not contain {w!r}: {msg!r}"
    doc_exc, template = documented[rid]
    template = for_device(rid, template, str(_x(device).device))
    assert doc_exc == type(err).__name__
    assert re.fullmatch(template_regex(template), msg, re.S), \
        f"{rid}: message differs from the README table\n  raised: {msg}\n  doc:    {template}"
    assert len(no_kernel_calls) == before_calls, f"{rid}: kernels ran before the error"
    _assert_unchanged(holder, snap, rid)
    assert nf.get_backend() == setting, f"{rid}: the backend setting changed"


@pytest.mark.parametrize("counter", ["meta", "pair", "float"])
def test_momentum_none_checks_the_counter_before_reading_it(nf, backend, device, counter):
    """momentum=None (a cumulative average) reads num_batches_tracked on the host: only after
    the checks, so a counter of the wrong kind gets the counter-dtype row's kind of message,
    not a torch error from reading it."""
    m = _bin(nf, device, momentum=None)
    m.num_batches_tracked = {"meta": lambda: torch.tensor(1, device="meta"),
                             "pair": lambda: torch.tensor([1, 2], device=device),
                             "float": lambda: torch.tensor(2.0, device=device)}[counter]()
    snap = _snapshot(_state(m))
    with pytest.raises(ValueError, match="BatchInstanceNorm2d: num_batches_tracked must be"):
        m(_x(device))
    _assert_unchanged(m, snap, counter)


@pytest.mark.parametrize("layer", ["iebn", "assoc", "ilm", "functional-assoc"])
def test_inference_input_is_refused_by_every_layer(nf, backend, device, layer,
                                                   no_kernel_calls):
    """The inference-input row for the other layers and the functional forms: the same
    message with their name, before any kernel (AssocNorm and ILMNorm have no state to spoil,
    but would raise torch's error only after computing)."""
    m = {"iebn": _iebn, "assoc": _assoc, "ilm": _ilm,
         "functional-assoc": _assoc}[layer](nf, device)
    with torch.inference_mode():
        x = _x(device)
    call = (lambda: m(x)) if layer != "functional-assoc" else (lambda: nf.functional.assoc_norm(
        x, 2, m.encoder, m.decoder_mean, m.decoder_var, m.weight, m.bias))
    who = {"iebn": "InstanceEnhancementBatchNorm2d", "assoc": "AssocNorm", "ilm": "ILMNorm",
           "functional-assoc": "assoc_norm"}[layer]
    snap = _snapshot(_state(m))
    with pytest.raises(ValueError, match=rf"^{who}: input is an inference tensor"):
        call()
    assert no_kernel_calls == []
    _assert_unchanged(m, snap, layer)


_SAVED_BY_EVERY_LAYER = [("bin", n) for n in ("weight", "bias", "gate")] + [
    ("iebn", n) for n in ("gate_weight", "gate_bias")] + [
    ("assoc", n) for n in ("encoder", "decoder_var", "weight")] + [
    ("ilm", n) for n in ("decoder_weight", "bias")] + [
    ("bin-eval", "running_var"), ("iebn-eval", "running_mean")]


@pytest.mark.parametrize("layer,name", _SAVED_BY_EVERY_LAYER, ids=str)
def test_inference_tensor_saved_for_backward_is_refused(nf, backend, device, layer, name,
                                                       no_kernel_calls):
    """A frozen parameter (or, in eval mode, a running statistic) made under inference mode,
    e.g. loaded there, in a call whose input requires grad: autograd would refuse to save it,
    but only after the call updated the running statistics. Refused first, naming it, and
    accepted where nothing records the call (torch.no_grad)."""
    kind, _, mode = layer.partition("-")
    m = {"bin": _bin, "iebn": _iebn, "assoc": _assoc, "ilm": _ilm}[kind](nf, device)
    m.train(mode != "eval")
    with torch.inference_mode():
        frozen = getattr(m, name).detach().clone()
    if name.startswith("running"):
        setattr(m, name, frozen)
    else:
        setattr(m, name, torch.nn.Parameter(frozen, requires_grad=False))
    x = _x(device).requires_grad_()
    snap = _snapshot(_state(m))
    with pytest.raises(ValueError, match=rf"^{type(m).__name__}: {name} is an inference tensor"):
        m(x)
    assert no_kernel_calls == []
    _assert_unchanged(m, snap, layer)
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_strided_input_aliased_by_a_running_statistic_is_refused(nf, backend, device):
    """running-alias-input for an input that is a strided view (the common-path predicate
    reads a dense input's extent from its data pointer; a view is left to the checks)."""
    big = make_input((2, C, 5, 10), 7, torch.float32, device)
    x = big[..., :5]
    m = _bin(nf, device)
    m.running_mean = big.view(-1)[300:304]  # inside x's elements, not its first block
    before = big.clone()
    with pytest.raises(ValueError, match="running_mean must not share memory with input"):
        m(x)
    assert torch.equal(big, before)


@pytest.mark.parametrize("layer", ["bin", "assoc"])
def test_inference_input_is_accepted_where_nothing_saves_it(nf, backend, device, layer):
    """The inference-input row refuses only what autograd would record: without grad mode, with
    frozen parameters, or inside inference mode, an input made under inference mode gives the
    output a normal tensor gives (and a training call inside inference mode updates normal
    running statistics, as nn.BatchNorm2d's does)."""
    m = _bin(nf, device) if layer == "bin" else _assoc(nf, device)
    with torch.inference_mode():
        x = _x(device)
    want = m(x.clone())
    ref = copy.deepcopy(m)
    for ctx in (torch.no_grad, torch.inference_mode):
        m.load_state_dict(ref.state_dict())
        with ctx():
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m.load_state_dict(ref.state_dict())
    m.requires_grad_(False)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    if layer == "bin":  # the running statistics were updated on every call
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) + 1


def test_rows_raise_without_partial_state_over_a_sequence(nf, backend, device):
    """A module that sees every bad input in turn, between good calls, ends where good calls
    alone would leave it (running stats and num_batches_tracked)."""
    torch.manual_seed(0)
    good = [make_input(SHAPE, s, torch.float32, device) for s in range(3)]
    bad = [make_input((1, C, 1, 1), 9, torch.float32, device),
           make_input((3, C + 1, 2, 3), 9, torch.float32, device),
           make_input((3, C, 2), 9, torch.float32, device), (good[0] * 3).to(torch.int32),
           good[0].to_sparse(), good[0][0, 0]]
    ref = _bin(nf, device, momentum=None)
    m = _bin(nf, device, momentum=None)
    for x in good:
        ref(x)
    for i, x in enumerate(good):
        m(x)
        for b in bad:
            with pytest.raises((ValueError, TypeError)):
                m(b)
    for (n, a), (_, b) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), f"buffer {n} differs after failed calls"


def test_env_backend_unknown_name_is_reported_at_first_call():
    """NORMFUSE_BACKEND is validated lazily: the first call raises, naming the variable."""
    code = ("import torch, normfuse\n"
            "m = normfuse.BatchInstanceNorm1d(3)\n"
            "before = m.running_mean.clone()\n"
            "try:\n"
            "    m(torch.randn(4, 3))\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n"
            "print('SAME', bool(torch.equal(before, m.running_mean)),"
            " int(m.num_batches_tracked))\n")
    env = dict(os.environ, NORMFUSE_BACKEND="fused", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERR NORMFUSE_BACKEND: unknown backend 'fused'" in res.stdout, res.stdout
    assert "SAME True 0" in res.stdout, res.stdout


# --------------------------------------------------------------- backend-dependent behaviour
def _noncontig(t):
    """The same values as ``t`` in a strided (every other element) view."""
    big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = big[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


CONSISTENCY = ["noncontig-weight", "noncontig-running", "noncontig-encoder", "assoc-embed-0"]


@pytest.mark.parametrize("case", CONSISTENCY)
def test_backend_consistency(nf, backend, device, case):
    """Inputs that every backend must treat alike: a strided (non-contiguous) parameter or
    running statistic is a valid argument, and AssocNorm's functional form with an empty
    encoder (embed_dim 0) is refused, as the module refuses it.  docs/errors.md, section 2."""
    x = _x(device)
    if case.startswith("noncontig") and case != "noncontig-encoder":
        a = _fargs(device)
        b = {k: v.clone() for k, v in a.items()}
        for k in (["weight", "gate"] if case == "noncontig-weight" else
                  ["running_mean", "running_var"]):
            b[k] = _noncontig(b[k])
        with nf.use_backend("torch"):
            want = _fbin(nf, x, a)
        got = _fbin(nf, x, b)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(b["running_mean"], a["running_mean"])
        torch.testing.assert_close(b["running_var"], a["running_var"])
    elif case == "noncontig-encoder":
        a = _assoc_args(device, g=2, m=2)
        a["encoder"] = torch.tensor([[0.3, -0.2], [0.5, 0.1]], device=device).t()
        assert not a["encoder"].is_contiguous()
        with nf.use_backend("torch"):
            want = _fassoc(nf, x, 2, a)
        torch.testing.assert_close(_fassoc(nf, x, 2, a), want)
    else:
        a = _assoc_args(device, g=2, m=1)
        a["encoder"] = torch.ones(0, 2, device=device)
        a["decoder_mean"] = torch.ones(2, 0, device=device)
        a["decoder_var"] = torch.ones(2, 0, device=device)
        with pytest.raises(ValueError, match="encoder"):
            _fassoc(nf, x, 2, a)


# ------------------------------------------ AssocNorm / ILM-Norm coefficient ops, every backend
F64 = torch.float64
OP_REFUSALS = {  # form -> (what replaces the good call's arguments, directions, words named)
    # an empty meta network (E = 0, or AssocNorm's M = 0): the torch backend computed with it
    "embed-0": (lambda a: {"encoder": a["encoder"][:0], "decoder_1": a["decoder_1"][:, :0],
                           "decoder_2": a["decoder_2"][:, :0]}, ("", "_backward"), ("encoder",)),
    # float32 and float64 statistics mixed: the torch backend promoted them or failed in a matmul
    "m2-float64": (lambda a: {"m2": a["m2"].to(F64)}, ("", "_backward"), ("m2",)),
    "mean-float64": (lambda a: {"mean": a["mean"].to(F64)}, ("", "_backward"),
                     ("m2", "mean")),  # m2 unlike mean (on a GPU: float64 mean refused)
    "sum_dy-float64": (lambda a: {"sum_dy": a["sum_dy"].to(F64)}, ("_backward",), ("sum_dy",)),
    "sum_dy_xmu-float64": (lambda a: {"sum_dy_xmu": a["sum_dy_xmu"].to(F64)}, ("_backward",),
                           ("sum_dy_xmu",)),
}


def _assert_names(msg, op, words):
    """A refusal's message names the op (``<namespace>.<op>: ``) and one of ``words``."""
    assert re.search(rf"\.{op}: ", msg), f"message does not name {op}: {msg!r}"
    assert any(re.search(rf"(?<![\w.]){w}(?!\w)", msg) for w in words), \
        f"message does not name {words}: {msg!r}"


def _op_call(ops, layer, direction, a):
    """``<layer>_coefficients<direction>`` of ``ops`` with the arguments ``a``."""
    op = getattr(ops, f"{layer}_coefficients{direction}")
    args = (a["mean"], a["m2"], 3, 2, a["encoder"], a["decoder_1"], a["decoder_2"], a["weight"],
            a["bias"], 1e-5)
    return op(*((a["sum_dy"], a["sum_dy_xmu"]) if direction else ()), *args)


@pytest.mark.parametrize("layer", ["assoc", "ilm"])
@pytest.mark.parametrize("form,direction", [
    pytest.param(form, d, id=f"{form}-{'backward' if d else 'forward'}")
    for form, (_, directions, _) in OP_REFUSALS.items() for d in directions])
def test_coefficient_ops_refuse_alike(backend, device, layer, form, direction):
    """The AssocNorm / ILM-Norm coefficient ops (``normfuse.backends.ops_for(backend)``: the
    torch backend's PyTorch functions, the C++ ops, the Triton ops) refuse the same arguments
    with a message naming the op and the argument; the C++ checks (csrc/common/
    coefficients_glue.h) are the contract.  (The torch backend accepted an empty meta network
    and mixed float32 / float64 statistics.)"""
    from normfuse.backends import ops_for
    change, _, words = OP_REFUSALS[form]
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    n, c, e = 2, 4, 2  # 2 groups (AssocNorm: the encoder's columns), ILM-Norm 2 key groups
    a = dict(mean=rnd(n, c), m2=rnd(n, c).abs() + 1, sum_dy=rnd(n, c), sum_dy_xmu=rnd(n, c),
             encoder=rnd(e, 2), decoder_1=rnd(2, e), decoder_2=rnd(2, e), weight=rnd(c),
             bias=rnd(c))
    _op_call(ops_for(backend), layer, direction, a)  # the good call runs
    op = f"{layer}_coefficients{direction}"
    with pytest.raises((RuntimeError, ValueError)) as info:
        _op_call(ops_for(backend), layer, direction, {**a, **change(a)})
    _assert_names(str(info.value), op, words)


BATCH_OP_REFUSALS = {  # form -> (what replaces the good call's arguments, directions, words named)
    "m2-float64": (lambda a: {"m2": a["m2"].to(F64)}, ("", "_backward"), ("m2",)),
    "mean-float64": (lambda a: {"mean": a["mean"].to(F64)}, ("", "_backward"), ("m2", "mean")),
    "sum_dy-float64": (lambda a: {"sum_dy": a["sum_dy"].to(F64)}, ("_backward",), ("sum_dy",)),
    # a (1,) gate: PyTorch ops broadcast it
    "gate-broadcast": (lambda a: {"gate": a["gate"][:1]}, ("", "_backward"),
                       ("gate", "gate_weight")),
    "weight-float64": (lambda a: {"weight": a["weight"].to(F64)}, ("", "_backward"), ("weight",)),
    "running_var-missing": (lambda a: {"running_var": None}, ("",), ("running_var",)),
    "plane-0": (lambda a: {"plane": 0}, ("", "_backward"), ("plane_size",)),
}


def _batch_op_call(ops, layer, direction, a):
    """``<layer>_coefficients<direction>`` of ``ops`` (BIN / IEBN) with the arguments ``a``, in
    training (the forward updates the running statistics and counts the batch)."""
    op = getattr(ops, f"{layer}_coefficients{direction}")
    gates = (a["gate"],) if layer == "bin" else (a["gate"], a["gate_bias"])
    head = (a["mean"], a["m2"], a["plane"], *gates, a["weight"], a["bias"], a["running_mean"],
            a["running_var"], True)
    if direction:
        return op(a["sum_dy"], a["sum_dy_xmu"], *head, 1e-5)
    return op(*head, 0.1, 1e-5, a["num_batches_tracked"])


@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("form,direction", [
    pytest.param(form, d, id=f"{form}-{'backward' if d else 'forward'}")
    for form, (_, directions, _) in BATCH_OP_REFUSALS.items() for d in directions])
def test_batch_coefficient_ops_refuse_alike(backend, device, layer, form, direction):
    """The BIN / IEBN coefficient ops refuse the same arguments on every backend, naming the op
    and the argument, and a refused forward leaves the running statistics and the batch counter
    as they were.  (The torch backend broadcast a (1,) gate, promoted mixed float32 / float64
    statistics and returned zeros for plane_size 0.)"""
    from normfuse.backends import ops_for
    change, _, words = BATCH_OP_REFUSALS[form]
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    n, c = 3, 4
    a = dict(mean=rnd(n, c), m2=rnd(n, c).abs() + 1, sum_dy=rnd(n, c), sum_dy_xmu=rnd(n, c),
             gate=rnd(c).sigmoid(), gate_bias=rnd(c), weight=rnd(c), bias=rnd(c),
             running_mean=rnd(c), running_var=rnd(c).abs() + 1, plane=5,
             num_batches_tracked=torch.tensor(7, device=device))
    _batch_op_call(ops_for(backend), layer, direction, dict(a))  # the good call runs
    before = {k: a[k].clone() for k in ("running_mean", "running_var", "num_batches_tracked")}
    op = f"{layer}_coefficients{direction}"
    with pytest.raises((RuntimeError, ValueError)) as info:
        _batch_op_call(ops_for(backend), layer, direction, {**a, **change(a)})
    _assert_names(str(info.value), op, words)
    for k, v in before.items():
        assert torch.equal(a[k], v), f"{k} changed by a refused call"
