"""Tracing a model for ``convert(..., fuse_relu=True)`` (normfuse/fuse.py): the tracer that
keeps normfuse norms as leaves and records what a graph cannot show (calls with non-tensor
arguments, Proxies standing for non-tensors, the grad / autocast mode of every node), one
module's trace in train and eval mode that puts back what tracing changed, and the reading of a
graph: which forward made a node (``_owner``) and which ReLU, if any, is a norm call's only user
(``_relu_after``)."""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import inspect
import itertools
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn

from .modules import _Activation, _has_hooks
from .norm_act import plain_identity

# Every normfuse layer (BIN, IEBN 1d-3d and their Sync forms, AssocNorm, ILMNorm) carries the
# ``activation`` attribute of _Activation.
NORM_TYPES = (_Activation,)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)  # F.relu_ is torch.relu_
_RELU_METHODS = ("relu", "relu_")


class _Untraceable(Exception):
    """Tracing a module failed.  ``candidates``: (submodule, its path) whose own forward may be
    the cause, most likely first (none: the module's own forward); ``certain``: whether the
    first one is (a trace error names it; a train/eval difference only narrows it down)."""

    def __init__(self, reason: str, candidates=(), certain: bool = True):
        super().__init__(reason)
        self.reason, self.candidates, self.certain = reason, list(candidates), certain


# Reading a real tensor's value (a buffer or tensor attribute: torch.fx proxies only parameters
# and arguments) while tracing: the trace would freeze the branch or number it gives, and a
# loaded checkpoint or a later update would not reach the graph.
_VALUE_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")
_tracing_depth: dict = {}  # thread id -> how many traces it is inside
_value_reads_lock = threading.Lock()
_saved_reads: dict = {}  # name -> what torch.Tensor's own __dict__ held (_MISSING: nothing)
_MISSING = object()


def _refused(name: str, original):
    def read(tensor, *args, **kwargs):
        if _tracing_depth.get(threading.get_ident()):  # other threads: as always
            raise fx.proxy.TraceError(
                f"its forward reads a tensor's value (Tensor.{name}), which a graph would "
                "hold as traced")
        return original(tensor, *args, **kwargs)
    read.normfuse_wrapper = True
    return read


@contextlib.contextmanager
def _tensor_values_unreadable():
    """While this thread traces, reading a real tensor's value raises TraceError (the module
    is then untraceable, and reported); torch.Tensor's methods are wrapped while any thread
    traces (nested traces counted per thread), and what was there before is put back after the
    last (unless someone replaced the wrapper meanwhile: then theirs stays)."""
    me = threading.get_ident()
    with _value_reads_lock:
        if not _tracing_depth:  # (a thread's entry goes when its depth is back to 0)
            for name in _VALUE_READS:
                _saved_reads[name] = vars(torch.Tensor).get(name, _MISSING)
                setattr(torch.Tensor, name, _refused(name, getattr(torch.Tensor, name)))
        _tracing_depth[me] = _tracing_depth.get(me, 0) + 1
    try:
        yield
    finally:
        with _value_reads_lock:
            _tracing_depth[me] -= 1
            if not _tracing_depth[me]:
                del _tracing_depth[me]
            if not _tracing_depth:
                for name in _VALUE_READS:
                    if getattr(vars(torch.Tensor).get(name), "normfuse_wrapper", False):
                        saved = _saved_reads.pop(name, _MISSING)
                        if saved is _MISSING:
                            delattr(torch.Tensor, name)  # inherited from TensorBase
                        else:
                            setattr(torch.Tensor, name, saved)


def _hooked_output(value):
    """Marks, in a trace, the output of a module with hooks traced through (never run: the
    graphs that run keep such a module as a call): a hook may change what its module returns,
    so no norm -> ReLU pair may pass through it."""
    return value


class _Tracer(fx.Tracer):
    """Keeps normfuse norms (and the modules in ``opaque``, by id) as leaves; remembers the
    innermost module whose forward raised."""

    def __init__(self, opaque=()):  # torch.load of a whole GraphModule retraces without one
        super().__init__()
        self.opaque = opaque
        self.failed = None
        self.non_tensor_calls = set()  # ids of modules called with anything but tensors
        self.constants = set()  # names of the constants it set on the root
        # Nodes standing for what is not a tensor (an LSTM's tuple) though a Proxy: a forward
        # given one may branch on its type (isinstance) and take another branch than at run
        # time, so the ids of such forwards' modules (``unreliable``) are not fused.
        self.not_tensors = set()
        self.unreliable = set()

    def trace(self, root, concrete_args=None):
        with _tensor_values_unreadable():
            return super().trace(root, concrete_args)

    def get_fresh_qualname(self, prefix: str) -> str:
        name = super().get_fresh_qualname(prefix)
        self.constants.add(name)
        return name

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, NORM_TYPES) or id(m) in self.opaque
                or super().is_leaf_module(m, module_qualified_name))

    def create_node(self, *args, **kwargs):
        # Grad mode and autocast as the forward had them when it made the node: a graph does not
        # keep them (_graph_keeps_forward compares them with the trace's own).
        node = super().create_node(*args, **kwargs)
        node.meta["normfuse_modes"] = _modes()
        return node

    def call_module(self, m, forward, args, kwargs):
        # (None, a list, a number: a graph of m's own forward, traced with a Proxy for each
        # argument, would take another branch than this call does)
        values = list(itertools.chain(args, kwargs.values()))
        if not all(isinstance(a, fx.Proxy) for a in values):
            self.non_tensor_calls.add(id(m))
        given = any(isinstance(a, fx.Proxy) and a.node in self.not_tensors
                    for a in _flatten(values))
        try:
            leaf = self.is_leaf_module(m, self.path_of_module(m))
        except Exception:
            leaf = True
        if given and not leaf:
            self.unreliable.add(id(m))
            self.non_tensor_calls.add(id(m))
        try:
            # m.forward, not m(...): the hooks stay on the modules and run at run time (a graph
            # keeps submodules as calls); run here they would get Proxies (a hook keeping its
            # module's output would keep a Proxy) and their checks could fail the trace
            out = super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)
            if not leaf and _has_hooks(m):  # (a pass-through module adds no node of its own)
                out = pytree.tree_map(
                    lambda v: self.create_proxy("call_function", _hooked_output, (v,), {})
                    if isinstance(v, fx.Proxy) else v, out)
            if leaf and isinstance(out, fx.Proxy) and (
                    given or _returns_non_tensor(m)
                    or id(m) in self.opaque and not _annotated_tensor(m)):
                self.not_tensors.add(out.node)
            return out
        except Exception:
            if self.failed is None:  # the innermost call catches it first
                try:
                    self.failed = (m, self.path_of_module(m))
                except Exception:
                    self.failed = False  # not a submodule: no culprit to keep as a leaf
            raise


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        elif isinstance(v, dict):
            yield from _flatten(list(v.values()))
        else:
            yield v


def _returns_non_tensor(m: nn.Module) -> bool:
    """torch.nn modules (leaves of a trace) that return tuples: recurrent layers, attention,
    pooling with ``return_indices``."""
    return (isinstance(m, (nn.RNNBase, nn.MultiheadAttention))
            or bool(getattr(m, "return_indices", False)))


def _annotated_tensor(m: nn.Module) -> bool:
    """Whether ``m``'s forward says it returns a tensor (a module kept as a leaf because it
    does not trace may return anything else)."""
    try:
        annotation = inspect.signature(type(m).forward).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation in (torch.Tensor, "Tensor", "torch.Tensor")


def _modes() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _owner(node: fx.Node) -> str:
    """Path of the module whose forward created ``node`` ("" for the traced module itself)."""
    stack = [qualname for qualname, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


class _Traced(NamedTuple):
    graph: fx.Graph  # the eval-mode trace (the train-mode one is the same)
    constants: dict  # what the tracer set on the module (removed from it again)
    non_tensor_calls: set  # ids of the modules called with anything but tensors
    unreliable: set  # ids of the modules given a Proxy that may stand for a non-tensor
    changed: bool  # whether the forward changed module attributes (undone: Proxies)
    updated: bool  # whether it updated a buffer or tensor attribute in place (undone too)


def _trace(module: nn.Module, opaque: dict, guard: "TensorGuard") -> _Traced:
    """``module``'s graph, traced in train and in eval mode (which must agree: a graph freezes
    the branches a forward takes on ``self.training``), and what the tracing saw
    (``_Traced``); raises ``_Untraceable``.  ``guard``: the model's tensor values before
    any trace, put back after this one where it updated them."""
    modes = [(m, m.training) for m in module.modules()]
    # What a forward sets on a module (``self.last = out``, ``self.taps.append(y)``, a buffer it
    # registers) would stay, a Proxy: put back after, containers' contents too (one level).
    attributes = [(m, dict(vars(m)), {k: copy.copy(v) for k, v in vars(m).items()
                                      if isinstance(v, _CONTAINERS)})
                  for m, _ in modes]

    tracer = None

    def take_constants():  # the constants the tracer set on ``module``, removed from it
        names = tracer.constants if tracer is not None else ()
        taken = {name: vars(module)[name] for name in names
                 if name in vars(module) and name not in attributes[0][1]}
        for name in taken:
            delattr(module, name)
        return taken

    graphs, non_tensor_calls, unreliable, changed = [], set(), set(), False
    try:
        for training in (True, False):
            for m, _ in modes:
                m.training = training  # the attribute, not .train(): no overridden train() runs
            take_constants()  # the previous mode's: each trace sets its own
            tracer = _Tracer(opaque)
            try:
                graphs.append(tracer.trace(module))
            except Exception as exc:
                raise _Untraceable(_first_line(exc), [tracer.failed] if tracer.failed else ())
            non_tensor_calls |= tracer.non_tensor_calls
            unreliable |= tracer.unreliable
    finally:
        constants = take_constants()
        for m, training in modes:
            m.training = training
        for m, own, contents in attributes:
            changed |= _put_back(m, own, contents)
        updated = guard.restore(m for m, _ in modes)
    for a, b in itertools.zip_longest(graphs[0].nodes, graphs[1].nodes):
        if a is None or b is None or a.format_node() != b.format_node():
            # The branch is in the forward of the module that created one of the two nodes.
            paths = dict.fromkeys(_owner(n) for n in (a, b) if n is not None)
            raise _Untraceable("its forward depends on train/eval mode (self.training)",
                               [(module.get_submodule(p), p) for p in paths if p],
                               certain=False)
    return _Traced(graphs[1], constants, non_tensor_calls, unreliable, changed, updated)


def _tensors_of(m: nn.Module):
    """The buffers and tensor attributes of ``m`` (not parameters: torch.fx proxies those)."""
    for t in (*m._buffers.values(), *vars(m).values()):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            yield t


class TensorGuard:
    """What a forward updates in place while it is traced (``self.step += 1``, an EMA's
    ``mul_``): torch.fx proxies parameters, not buffers or tensor attributes, so such updates
    really run, once a trace, and a graph does not record them.  Taken once before the first
    trace: a host copy of every buffer and tensor attribute of the model (not per trace, and
    not in device memory: a model's buffers may be large); ``restore`` after each trace puts
    back what moved (by version counter; inference tensors, which have none, by value) and says
    whether anything had.  Meta and uninitialized (lazy) tensors hold no values: left out."""

    def __init__(self, model: nn.Module):
        self._saved = {}  # id -> [tensor, version or None (inference tensor), host copy]
        for m in model.modules():
            for t in _tensors_of(m):
                if id(t) in self._saved or t.is_meta or nn.parameter.is_lazy(t):
                    continue
                version = None if t.is_inference() else t._version
                self._saved[id(t)] = [t, version, t.detach().to("cpu", copy=True)]

    @staticmethod
    def _moved(t: torch.Tensor, version, saved: torch.Tensor) -> bool:
        if version is not None:
            return t._version != version
        now = t.detach().cpu().reshape(-1)  # bitwise: NaNs equal, -0.0 differs from 0.0
        return not torch.equal(now.view(torch.uint8), saved.reshape(-1).view(torch.uint8))

    def restore(self, modules) -> bool:
        updated = False
        with torch.no_grad():
            for m in modules:
                for t in _tensors_of(m):
                    entry = self._saved.get(id(t))
                    if entry is None or not self._moved(*entry):
                        continue
                    t.copy_(entry[2])
                    entry[1] = None if entry[1] is None else t._version
                    updated = True
        return updated


_CONTAINERS = (collections.abc.MutableMapping, collections.abc.MutableSequence,
               collections.abc.MutableSet)


def _put_back(m: nn.Module, own: dict, contents: dict) -> bool:
    """Put ``m``'s attributes back as they were (``own``: its ``__dict__``; ``contents``: shallow
    copies of its containers); whether anything had changed."""
    changed = False
    for name in [n for n in vars(m) if n not in own]:
        del m.__dict__[name]
        changed = True
    for name, value in own.items():
        if m.__dict__.get(name, own) is not value:
            m.__dict__[name] = value
            changed = True
    for name, saved in contents.items():
        value = own[name]
        if isinstance(value, collections.abc.MutableMapping):
            if value.keys() != saved.keys() or any(value[k] is not saved[k] for k in saved):
                value.clear()
                value.update(saved)
                changed = True
        elif isinstance(value, collections.abc.MutableSequence):
            if len(value) != len(saved) or any(a is not b for a, b in zip(value, saved)):
                value.clear()
                value.extend(saved)
                changed = True
        elif value != saved:
            value.clear()
            for item in saved:
                value.add(item)
            changed = True
    return changed


def _plain_relu(module: nn.Module) -> bool:
    """An ``nn.ReLU`` (a subclass may override forward) without hooks (they would no longer
    run once it is fused)."""
    return type(module) is nn.ReLU and not _has_hooks(module)


def _relu_input(node: fx.Node, module: nn.Module):
    """The node ``node`` applies a ReLU to, if ``node`` is a ReLU of one input, else None."""
    if node.op == "call_module":
        if not _plain_relu(module.get_submodule(node.target)):
            return None
    elif node.op == "call_function":
        if node.target not in _RELU_FUNCTIONS:
            return None
    elif node.op != "call_method" or node.target not in _RELU_METHODS:
        return None
    args = list(node.args) + [v for k, v in node.kwargs.items() if k not in ("input", "inplace")]
    source = node.args[0] if node.args else node.kwargs.get("input")
    if any(isinstance(a, fx.Node) for a in args[1:]):
        return None
    return source if isinstance(source, fx.Node) else None


def _relu_after(node: fx.Node, module: nn.Module):
    """The ReLU node that is the only user of ``node`` (a norm's call), made by the same
    forward, directly or through plain ``nn.Identity`` modules that forward calls, each the
    other's only user
    (timm's blocks call a ``drop_block`` between norm and ReLU, an Identity unless drop-block
    is on), else None.  The same forward: a norm at the end of a submodule's forward (DenseNet's
    ``features``) is that submodule's output, which code may also take on its own."""
    owner = _owner(node)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _owner(user) != owner:
            return None
        if _relu_input(user, module) is node:
            return user
        if user.op != "call_module" or not plain_identity(module.get_submodule(user.target)):
            return None
        node = user
    return None

def _norm_calls(graph: fx.Graph, module: nn.Module, norms: set) -> list:
    return [node for node in graph.nodes
            if node.op == "call_module" and id(module.get_submodule(node.target)) in norms]

