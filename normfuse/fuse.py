"""``convert(..., fuse_relu=True)``: fuse each normfuse norm whose output goes only into a ReLU.

The model is traced with ``torch.fx`` as a whole (normfuse norms kept as leaves), so the graph
shows every call of every module, and which forward makes it (``_owner``).  A norm call whose
only user is a ReLU (``nn.ReLU``, ``torch.relu``/``relu_``, ``F.relu`` with or without
``inplace``, ``Tensor.relu``/``relu_``) made by the same forward, directly or through plain
``nn.Identity`` modules that forward calls, is a pair; a norm module is fused when every one of
its call sites is such a pair: its ``activation`` becomes ``"relu"`` and those ReLU calls go.
(The same forward: a norm that ends a submodule's forward, DenseNet's ``features``, is that
submodule's output, which other code may take on its own.)  How the ReLU calls go:

* An ``nn.ReLU`` module called only at such pairs becomes an ``nn.Identity`` where it sits: the
  module keeps its class, its own forward and everything else it has.
* A ReLU that is a function call, or a module also called elsewhere (torchvision's blocks call
  one ``self.relu`` after ``bn1``, ``bn2`` and the residual add), needs a graph without that
  node: the module whose forward makes the pair is replaced by a ``FusedGraphModule`` of its own
  forward (every submodule a leaf, so their hooks still run), where one can stand for it
  (``_not_replaceable``: a class adding to nn.Module only ``__init__``, ``forward`` and
  constants; a forward without optional arguments, called with tensors only
  (``_Tracer.call_module`` sees every call), setting no grad mode or autocast, changing no
  attributes and reading no mutable ones (``_shallow_graph``), checking no types, checkpointing
  nothing and reading no plain globals (``_graph_keeps_forward``)).  Else that module stays
  itself and the pair is left, named in the warning.  The plain values that forward reads
  (attributes, class constants) are in the graph: setting one on the GraphModule raises
  (``FusedGraphModule.__setattr__``).

Modules whose forward cannot be traced (data-dependent control flow, a forward that differs
between train and eval mode, which a graph would freeze, or one traced on its own that takes
optional arguments) are kept as leaves of the graph around them, fused on their own, and
reported together in one warning; containers without a forward (ModuleList) are fused child by
child, silently.  What a forward outside a leaf calls inside it is neither fused nor replaced in
the leaf's own fusing (``_Context.pinned``), nor is anything in a module given a Proxy that may
stand for something else than a tensor (``_Tracer.not_tensors``: a recurrent layer's tuple, an
untraceable module's output unless annotated ``-> torch.Tensor``): its forward may branch on
the type.

A norm + act module (``normfuse.norm_act``, what convert makes of timm's ``BatchNormAct2d`` /
``GroupNormAct``) whose ``act`` is a plain ``nn.ReLU`` takes it in as its ``activation`` first,
without tracing; one with another ``act`` (or ``drop``) is never fused with a ReLU after it.

Fusing changes the modules themselves: code other than the traced forward that calls a fused
norm (another method of the model) gets relu(norm(x)), and one that calls a ReLU module that
became an Identity gets its input back.  Not detected either: an untraceable module's forward
calling into a traceable child (``self.block.bn(x)``, ``self.block.relu(y)``, bypassing
``self.block``), a ReLU module called through ``.forward``.
"""
from __future__ import annotations

import collections
import copy
import inspect
import itertools
import types
import collections.abc
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import _Activation, _has_hooks
from .norm_act import _NormAct, plain_identity

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
            out = super().call_module(m, forward, args, kwargs)
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


def _trace(module: nn.Module, opaque: dict) -> _Traced:
    """``module``'s graph, traced in train and in eval mode (which must agree: a graph freezes
    the branches a forward takes on ``self.training``), and what the tracing saw
    (``_Traced``); raises ``_Untraceable``."""
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
    for a, b in itertools.zip_longest(graphs[0].nodes, graphs[1].nodes):
        if a is None or b is None or a.format_node() != b.format_node():
            # The branch is in the forward of the module that created one of the two nodes.
            paths = dict.fromkeys(_owner(n) for n in (a, b) if n is not None)
            raise _Untraceable("its forward depends on train/eval mode (self.training)",
                               [(module.get_submodule(p), p) for p in paths if p],
                               certain=False)
    return _Traced(graphs[1], constants, non_tensor_calls, unreliable, changed)


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


def _under(path: str, prefix: str) -> bool:
    return not prefix or path.startswith(prefix + ".")


class _Context:
    def __init__(self, root: nn.Module):
        self.root = root
        # Every path of every module object (a module may sit at several).
        self.paths = {}
        for name, m in root.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), []).append(name)
        self.untraced = []  # (path, class name, reason)
        self.kept = {}  # norm path -> (path, class, why) of the module whose forward has its pair
        self.done = set()  # ids of the modules fused (and of what replaced them)
        self.unsure = {}  # path -> class of modules left alone: given what may not be a tensor
        # ids of modules inside a module kept as a leaf that a forward outside it calls: the
        # leaf's own trace does not see those calls, so they are neither fused nor replaced.
        self.pinned = set()

    def in_reach(self, m: nn.Module, path: str, leaf_paths) -> bool:
        """Whether every place ``m`` sits is under ``path`` and not inside a leaf of the trace
        (whose forward may call it unseen), and no forward outside the trace calls it."""
        return id(m) not in self.pinned and all(
            _under(p, path) and not any(_under(p, o) for o in leaf_paths)
            for p in self.paths.get(id(m), []))

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` wherever ``old`` sits."""
        for p in self.paths.pop(id(old), []):
            parent, _, name = p.rpartition(".")
            setattr(self.root.get_submodule(parent), name, new)
            self.paths.setdefault(id(new), []).append(p)


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


def _candidates(graph: fx.Graph, module: nn.Module, path: str, leaf_paths, ctx) -> dict:
    """The norms of ``graph`` (of ``module``, at ``path`` in the model) that may be fused: every
    call site a pair (``_relu_after``).  {id(norm): (norm, [(its node, the ReLU node)])}."""
    sites = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        norm = module.get_submodule(node.target)
        if not isinstance(norm, NORM_TYPES):
            continue
        sites.setdefault(id(norm), (norm, []))[1].append((node, _relu_after(node, module)))
    out = {}
    for key, (norm, calls) in sites.items():
        if getattr(norm, "activation", None) is not None:
            continue  # fused already (a timm norm + act's own ReLU)
        if isinstance(norm, _NormAct) and not norm._post_is_identity():
            continue  # relu(act(norm(x))): the ReLU comes after its own drop / act
        if _has_hooks(norm):
            continue  # its hooks would see relu(norm(x)) where they saw norm(x)
        if any(relu is None for _, relu in calls):
            continue  # a call site whose output has another user, or goes elsewhere
        if not ctx.in_reach(norm, path, leaf_paths):
            continue
        out[key] = (norm, calls)
    return out


def _by_identity(candidates: dict, graph: fx.Graph, module: nn.Module, path: str,
                 leaf_paths, ctx) -> dict:
    """The candidates whose every ReLU is an ``nn.ReLU`` module called only after candidates
    and sitting only in reach: replacing those modules by ``nn.Identity`` fuses the pairs
    without a graph.  (Removing a norm can take a ReLU module's last excuse away: repeated
    until nothing changes.)"""
    calls_of = {}  # id(ReLU module) -> its call nodes in the graph
    for node in graph.nodes:
        if node.op == "call_module" and _plain_relu(module.get_submodule(node.target)):
            calls_of.setdefault(id(module.get_submodule(node.target)), []).append(node)
    chosen = dict(candidates)
    while True:
        pair_relus = {relu for _, calls in chosen.values() for _, relu in calls}
        removable = {
            key for key, nodes in calls_of.items()
            if all(n in pair_relus for n in nodes)
            and ctx.in_reach(module.get_submodule(nodes[0].target), path, leaf_paths)}
        keep = {key: (norm, calls) for key, (norm, calls) in chosen.items()
                if all(relu.op == "call_module"
                       and id(module.get_submodule(relu.target)) in removable
                       for _, relu in calls)}
        if len(keep) == len(chosen):
            return keep
        chosen = keep


# What a class may add to nn.Module and still be stood for by a GraphModule (besides class-level
# constants): a GraphModule runs the traced forward and carries the object's attributes.
_GRAPH_REPLACEABLE = {"__init__", "forward", "extra_repr", "__module__", "__qualname__", "__doc__",
                      "__dict__", "__weakref__", "__annotations__", "__constants__",
                      "__firstlineno__", "__static_attributes__", "__classcell__",
                      "__orig_bases__", "__parameters__", "__annotate__", "__annotate_func__",
                      "__annotations_cache__"}
_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
_MODULE_NAMES = frozenset(dir(nn.Module))
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))
# What a GraphModule has that an nn.Module has not (``meta``, ``code``, ``graph``, ...).
_GRAPH_MODULE_NAMES = frozenset(
    (set(dir(fx.GraphModule)) | set(vars(fx.GraphModule(nn.Module(), fx.Graph()))))
    - _MODULE_NAMES - _MODULE_ATTRIBUTES)


def _one_trace_fits(module: nn.Module) -> str | None:
    """Why one trace of ``module`` on its own cannot show what its forward calls, or None.  A
    trace gives every argument a Proxy, so a default (``residual=None``) would be fixed to the
    branch a Proxy takes."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "its forward's signature is unknown"
    if any(p.default is not p.empty or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           for p in params):
        return "its forward takes optional or variable arguments, which one trace would fix"
    return None


def _graph_keeps_forward(module: nn.Module) -> str | None:
    """Why a graph of ``module``'s forward could not compute what the forward does, before
    tracing it, or None: a decorator may do anything around the call.  (Grad mode or autocast
    set inside, in the forward or a function it calls, shows in the trace: ``_shallow_graph``.)"""
    if hasattr(type(module).forward, "__wrapped__"):
        return "its forward is decorated"
    try:  # (an autocast for a device this machine lacks turns itself off while tracing)
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return "its forward's source is unknown"
    for word, what in (("autocast", "sets autocast"), ("checkpoint", "checkpoints")):
        if word in source:
            return f"its forward {what}, which a graph would not keep"
    names = _names_read(type(module).forward)
    if "isinstance" in names or "type" in names:
        return "its forward checks types, which a Proxy standing for a tensor fails"
    globals_ = getattr(type(module).forward, "__globals__", {})
    plain = sorted(n for n in names if n in globals_ and isinstance(globals_[n], _CONSTANT_TYPES))
    if plain:
        return f"its forward reads the global {plain[0]!r}, which a graph would hold as it is"
    return None


def _not_replaceable(module: nn.Module) -> str | None:
    """Why a GraphModule of its forward may not stand for ``module``, or None: a class that adds
    to nn.Module only ``__init__``, ``forward``, ``extra_repr`` and class-level constants
    (torchvision's BasicBlock and Bottleneck, a user's block), with a forward one trace fits
    and a graph keeps, may be replaced.  Methods or properties of its own (timm's
    ``reset_classifier``, a ``train`` that keeps BatchNorms frozen, nn.Sequential's indexing) a
    GraphModule would not have, or would have as nn.Module's: such a module stays what it is."""
    if isinstance(module, fx.GraphModule):
        return ("it is a graph already (convert(..., fuse_relu=True) made it?): convert the "
                "original model")
    for klass in type(module).__mro__:
        if klass in (nn.Module, object):
            continue
        for name, value in vars(klass).items():
            if name in _GRAPH_REPLACEABLE:
                continue
            if (name in _MODULE_NAMES or name.startswith("__")
                    or not isinstance(value, _CONSTANT_TYPES)):
                return (f"its class has {name!r} of its own, which a GraphModule standing for "
                        "it would not have")
    names = set(vars(module)).union(*(vars(k) for k in type(module).__mro__[:-2]))
    taken = sorted(names & _GRAPH_MODULE_NAMES)
    if taken:
        return f"its attribute {taken[0]!r} is a name torch.fx's GraphModule uses"
    return _one_trace_fits(module) or _graph_keeps_forward(module)


_MISSING = object()


def _names_read(function) -> set:
    """The names ``function``'s code (and the code nested in it) looks up: its attributes among
    them.  A class a GraphModule may stand for has no other methods (``_not_replaceable``)."""
    names, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def _shallow_graph(owner: nn.Module, norms: set):
    """The graph of ``owner``'s own forward (every submodule a leaf: their hooks still run, a
    replaced child stays a call), in which every call of the norms in ``norms`` (ids) is a pair
    (``_drop_relus`` takes the ReLUs out), its constants and the plain attributes of ``owner``
    it reads (their values are in the graph now); or the reason it cannot stand for the
    forward: grad mode or autocast set in it (traced with both on and off, every node records
    them), attributes it changes, a mutable plain attribute it reads (later changes would not
    reach the graph)."""
    leaves = {id(m): (m, n) for n, m in owner.named_modules() if m is not owner}
    kept = None
    for outer in ((torch.enable_grad, lambda: torch.autocast("cpu", enabled=False)),
                  (torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        with outer[0](), outer[1]():
            before = _modes()
            try:
                traced = _trace(owner, leaves)
            except _Untraceable as exc:
                return f"its forward alone does not trace ({exc.reason})"
        graph, constants = traced.graph, traced.constants
        if any(node.meta.get("normfuse_modes", before) != before for node in graph.nodes):
            return "its forward sets grad mode or autocast, which a graph would not keep"
        if traced.changed:
            return "its forward changes attributes of modules, which a graph would not"
        if constants:  # (from buffers, or made in the forward: a graph would hold them stale)
            return "its forward computes tensors a graph would hold as constants"
        if kept is not None and [n.format_node() for n in kept.nodes] != [
                n.format_node() for n in graph.nodes]:
            return "its forward depends on grad mode or autocast, which a graph would fix"
        kept = kept or graph  # the graph traced with grad on and autocast off
    graph = kept
    frozen = {}
    for name in _names_read(type(owner).forward):
        value = owner.__dict__.get(name, inspect.getattr_static(type(owner), name, _MISSING))
        if name in _MODULE_NAMES or name in _MODULE_ATTRIBUTES or value is _MISSING or (
                name not in owner.__dict__ and not isinstance(value, _CONSTANT_TYPES)):
            continue  # nn.Module's own, a global, or a method of another object
        if isinstance(value, (nn.Module, torch.Tensor)):
            continue  # read at run time (get_attr, call_module), not held
        if not isinstance(value, _CONSTANT_TYPES) and not isinstance(
                value, (types.FunctionType, types.BuiltinFunctionType)):
            return (f"its forward reads {name!r}, whose later changes would not reach a "
                    "graph")
        frozen[name] = value
    if any(_relu_after(node, owner) is None for node in _norm_calls(graph, owner, norms)):
        return "its forward alone makes another graph"
    return graph, constants, frozen


def _norm_calls(graph: fx.Graph, module: nn.Module, norms: set) -> list:
    return [node for node in graph.nodes
            if node.op == "call_module" and id(module.get_submodule(node.target)) in norms]


def _drop_relus(graph: fx.Graph, owner: nn.Module, norms: set) -> None:
    """Take the ReLU call after each call of the norms in ``norms`` (ids) out of ``graph``
    (``_shallow_graph`` checked there is one): its users take its input."""
    for node in _norm_calls(graph, owner, norms):
        relu = _relu_after(node, owner)
        relu.replace_all_uses_with(_relu_input(relu, owner))
        graph.erase_node(relu)
    graph.lint()


def _graph_module(owner: nn.Module, graph: fx.Graph, constants: dict,
                  frozen: dict) -> "FusedGraphModule":
    for name, value in constants.items():  # for the GraphModule to take
        setattr(owner, name, value)
    try:
        gm = FusedGraphModule(owner, graph, type(owner).__name__)
    finally:
        for name in constants:
            delattr(owner, name)
    gm.__dict__[_FROZEN] = frozen
    return gm


def _fuse_children(module: nn.Module, path: str, ctx) -> None:
    for name, child in list(module.named_children()):
        new = _fuse_module(child, f"{path}.{name}" if path else name, ctx)
        if new is not child:
            ctx.replace(child, new)


def _fuse_module(module: nn.Module, path: str, ctx) -> nn.Module:
    """``_fuse_one`` once per module object (a module kept as a leaf is fused before the graph
    around it, whose children may be visited again)."""
    if id(module) in ctx.done:
        return module
    result = _fuse_one(module, path, ctx)
    ctx.done.update((id(module), id(result)))
    return result


def _fuse_one(module: nn.Module, path: str, ctx) -> nn.Module:
    """``module`` (at ``path`` in the model) with the pairs of its forward fused, traced as a
    whole: a pair whose ReLU is a module called only after fused norms in place (the ReLU module
    an ``nn.Identity``); one that needs the graph by replacing the module whose forward makes it
    (the pair's owner) with a GraphModule of that forward, where one may stand for it
    (``_not_replaceable``).  Returns ``module``, or the GraphModule that replaces it."""
    if isinstance(module, NORM_TYPES) or not any(isinstance(m, NORM_TYPES)
                                                 for m in module.modules()):
        return module
    if type(module).forward is nn.Module.forward:  # a container (ModuleList, ModuleDict)
        _fuse_children(module, path, ctx)
        return module
    reason = _one_trace_fits(module)
    if reason is not None:
        ctx.untraced.append((path, type(module).__name__, reason))
        _fuse_children(module, path, ctx)
        return module
    opaque = {}  # id -> (submodule, path in module): kept as leaves
    guessed = []  # the ones a train/eval difference pointed at, perhaps wrongly
    while True:
        try:
            traced = _trace(module, opaque)
            break
        except _Untraceable as exc:
            fresh = [c for c in exc.candidates if c[0] is not module and id(c[0]) not in opaque]
            if not fresh:
                ctx.untraced.append((path, type(module).__name__, exc.reason))
                _fuse_children(module, path, ctx)
                return module
            opaque[id(fresh[0][0])] = fresh[0]
            if not exc.certain:
                guessed.append(id(fresh[0][0]))
    for key in guessed:  # keep as leaves only the guesses that are needed
        trial = {k: v for k, v in opaque.items() if k != key}
        try:
            traced = _trace(module, trial)
        except _Untraceable:
            continue
        opaque = trial
    graph = traced.graph
    full = lambda rel: f"{path}.{rel}" if path and rel else (path or rel)  # noqa: E731
    leaf_paths = [full(p) for _, p in opaque.values()]
    for name, m in module.named_modules():  # a forward given a Proxy for what may not be a
        if id(m) in traced.unreliable:  # tensor: its trace may not be its run
            ctx.pinned.update(id(sub) for sub in m.modules())
            if any(isinstance(sub, NORM_TYPES) for sub in m.modules()):
                ctx.unsure.setdefault(full(name), type(m).__name__)
    for node in graph.nodes:  # a leaf's insides, called from outside it: pinned
        if node.op == "call_module" and any(_under(node.target, p) for _, p in opaque.values()):
            ctx.pinned.add(id(module.get_submodule(node.target)))
    for sub, sub_path in opaque.values():
        new = _fuse_module(sub, full(sub_path), ctx)
        if new is not sub:
            ctx.replace(sub, new)
    leaf_paths += [full(n.target) for n in graph.nodes if n.op == "call_module"]
    candidates = _candidates(graph, module, path, leaf_paths, ctx)
    chosen = _by_identity(candidates, graph, module, path, leaf_paths, ctx)
    for norm, calls in chosen.values():
        norm.activation = "relu"
        for _, relu in calls:
            relu_module = module.get_submodule(relu.target)
            if id(relu_module) in ctx.paths:
                ctx.replace(relu_module, nn.Identity())
    # The rest need the graph of the forward that makes the pair: its owner's.
    owners = {}  # owner path (in module) -> ids of its norms
    rest = {key: value for key, value in candidates.items() if key not in chosen}
    for key, (norm, calls) in rest.items():
        for node, _ in calls:
            owners.setdefault(_owner(node), set()).add(key)
    why = {}  # owner path -> why no GraphModule may stand for it (None: one may)
    ordered = sorted(owners, key=lambda p: -p.count(".") - bool(p))  # deepest first
    for rel in ordered:
        owner = module.get_submodule(rel)
        why[rel] = _not_replaceable(owner)
        if why[rel] is None and rel and not ctx.in_reach(owner, path, leaf_paths):
            why[rel] = "it is also called or registered outside what was traced together"
        if why[rel] is None and id(owner) in traced.non_tensor_calls:
            why[rel] = ("it is called with arguments that are not tensors, which one graph of "
                        "its forward would fix")
    built = {}  # owner path -> its own forward's graph, constants, frozen values
    for rel in ordered:
        if why[rel] is None:  # does its own forward give the graph the full trace did?
            shallow = _shallow_graph(module.get_submodule(rel), owners[rel])
            if isinstance(shallow, str):
                why[rel] = shallow
            else:
                built[rel] = shallow
    for key, (norm, calls) in rest.items():  # every call site's owner must take the graph
        blocking = [_owner(node) for node, _ in calls if why[_owner(node)] is not None]
        if not blocking:
            norm.activation = "relu"
            continue
        for p in ctx.paths.get(key, []):
            rel = blocking[0]
            ctx.kept.setdefault(p, (full(rel), type(module.get_submodule(rel)).__name__, why[rel]))
    result = module
    for rel in ordered:  # deepest first: a parent's GraphModule adopts its child's
        fused = {k for k in owners[rel] if rest[k][0].activation == "relu"}
        if why[rel] is not None or not fused:
            continue
        owner = module.get_submodule(rel)
        own_graph, constants, frozen = built[rel]
        _drop_relus(own_graph, owner, fused)  # the ReLUs of the fused norms alone
        gm = _graph_module(owner, own_graph, constants, frozen)
        if rel:
            ctx.replace(owner, gm)
        else:
            result = gm
    return result


def _adopt(gm: nn.Module, own: dict) -> None:
    """Give ``gm`` the whole tree, parameters and buffers of the module whose ``__dict__`` is
    ``own`` (GraphModule keeps only what its graph references, under placeholder parents): same
    state_dict keys, in the same order, and the same submodule objects as the input model."""
    constants = {k: v for k, v in gm._buffers.items() if k not in own["_buffers"]}
    for name in ("_modules", "_parameters", "_buffers"):
        gm.__dict__[name] = dict(own[name])
    gm.__dict__["_non_persistent_buffers_set"] = set(own["_non_persistent_buffers_set"])
    for name, value in constants.items():  # tensor constants of the trace: plain attributes
        setattr(gm, name, value)


class FusedGraphModule(fx.GraphModule):
    """A ``torch.fx.GraphModule`` that keeps what the traced module object held besides the
    graph's code: its whole module tree (the same submodule objects, parameters and buffers, so
    the same ``state_dict`` keys), its hooks, its plain attributes and its class's constants
    (``_keep_own``), also through ``copy.deepcopy`` and ``torch.save``.  It stands only for
    modules whose class adds no methods or properties to nn.Module (``_not_replaceable``)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        _adopt(self, vars(root))
        _keep_own(self, vars(root), type(root), bound_to=root)
        self.training = root.training

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)  # rebuilt from a deep copy of self.__dict__ ...
        state = copy.deepcopy(self.__dict__, memo)  # ... which the memo holds: the same copies
        _adopt(res, state)
        _keep_own(res, state)  # (GraphModule's __deepcopy__ runs GraphModule.__init__)
        res.training = self.training
        return res

    def __copy__(self):  # (GraphModule's: a plain GraphModule of what its code references;
        # nn.DataParallel's replicas are such copies)
        res = FusedGraphModule(self, self.graph, type(self).__name__)
        res.meta = getattr(self, "meta", {})
        return res

    def __setattr__(self, name, value):
        frozen = self.__dict__.get(_FROZEN, {})
        if name in frozen and value is not frozen[name] and not (
                type(value) is type(frozen[name]) and value == frozen[name]):
            raise AttributeError(
                f"{type(self).__name__}.{name}: the fused graph of this module's forward "
                f"(convert(..., fuse_relu=True)) holds the value it had then ({frozen[name]!r}); "
                "setting it would change nothing. Set it before converting, or convert again.")
        super().__setattr__(name, value)

    def __reduce__(self):
        # GraphModule pickles its __dict__ (in the arguments of its rebuild, so a hook bound to
        # the module itself would recurse: _SelfBound stands for that binding) and its code,
        # and comes back as a plain GraphModule holding what the code references; _restore
        # gives it the rest back.
        rebuild, (body, *rest) = super().__reduce__()
        body["_graphmodule_cls_name"] = type(self).__name__  # the traced class's name
        for name in _HOOK_DICTS:
            if isinstance(body.get(name), dict):
                body[name] = _rebind(body[name], self, _SelfBound)
        return _restore, (rebuild, (body, *rest))


# Attribute of a FusedGraphModule: the plain attributes its forward read when it was traced,
# whose values its graph holds (setting one raises: it would change nothing).
_FROZEN = "_normfuse_frozen"
# nn.Module's hook dictionaries (forward, backward, state_dict, load_state_dict hooks) and
# flags (_is_full_backward_hook).
_HOOK_DICTS = tuple(name for name in vars(nn.Module()) if "hook" in name)
# How nn.Module keeps a hook that is called with the module (load_state_dict's): a weak
# reference to the module, which must be the fused model's, not the traced object's.
_WrappedHook = getattr(torch.nn.modules.module, "_WrappedHook", None)


class _SelfBound:
    """A pickled FusedGraphModule's hook that was bound to the module itself."""

    def __init__(self, hook):
        self.hook = hook


def _rebind(hooks: dict, old, new) -> dict:
    """A copy of ``hooks`` whose hooks bound to ``old`` are bound to ``new`` (a module, or
    _SelfBound: the binding's placeholder in a pickle)."""
    out = type(hooks)()
    for key, hook in hooks.items():
        if isinstance(hook, _SelfBound):
            hook = _WrappedHook(hook.hook, new)
        elif (_WrappedHook is not None and isinstance(hook, _WrappedHook)
              and getattr(hook, "with_module", False) and hook.module() is old):
            hook = new(hook.hook) if new is _SelfBound else _WrappedHook(hook.hook, new)
        out[key] = hook
    return out


def _keep_own(gm: fx.GraphModule, own: dict, cls: type | None = None, bound_to=None) -> None:
    """Give ``gm`` what the traced module object held that a GraphModule drops, from its
    ``__dict__`` ``own``: its hooks (copies of its hook dictionaries; hooks called with the
    module, bound to ``bound_to``, are bound to ``gm``), its plain attributes (the same objects:
    torchvision's ``Bottleneck.stride``, say) and the constants of its class ``cls``
    (``Bottleneck.expansion``; ``_not_replaceable`` allows no other class attributes)."""
    for name in _HOOK_DICTS:
        if name in own:
            value = own[name]
            gm.__dict__[name] = _rebind(value, bound_to, gm) if isinstance(value, dict) else value
    gm_class = type(gm)
    for name, value in own.items():
        if name not in gm.__dict__ and not hasattr(gm_class, name):
            gm.__dict__[name] = value
    for klass in (cls.__mro__ if cls is not None else ()):
        for name, value in vars(klass).items():
            if isinstance(value, _CONSTANT_TYPES) and not hasattr(gm_class, name):
                gm.__dict__.setdefault(name, value)


def _restore(rebuild, args) -> FusedGraphModule:
    """``torch.load`` of a FusedGraphModule: GraphModule's own rebuild (a plain GraphModule that
    holds what its code references, and the pickled attributes), given the rest of the pickled
    ``__dict__`` (the whole tree, the hooks), made a FusedGraphModule again."""
    loaded = rebuild(*args)
    body = args[0]
    _adopt(loaded, body)
    for name in _HOOK_DICTS:
        if name in body:
            loaded.__dict__[name] = body[name]
    return FusedGraphModule(loaded, loaded.graph,
                            body.get("_graphmodule_cls_name", type(loaded).__name__))


def _fuse_own_relu(model: nn.Module) -> None:
    """Each norm + act module (normfuse.norm_act: converted timm layers) whose ``act`` is a plain
    ``nn.ReLU`` after an identity ``drop``, neither with hooks: the ReLU goes into the layer
    (``activation="relu"``, ``act`` an ``nn.Identity``).  No tracing needed: the pair is the
    module's own forward."""
    for module in model.modules():
        if (isinstance(module, _NormAct) and module.activation is None
                and _plain_relu(module.act) and plain_identity(module.drop)):
            module.activation = "relu"
            module.act = nn.Identity()


def fuse_relu(model: nn.Module) -> nn.Module:
    """Fuse the norm->ReLU pairs of ``model`` (see the module docstring); warns naming the
    modules that could not be traced."""
    _fuse_own_relu(model)
    ctx = _Context(model)
    result = _fuse_module(model, "", ctx)
    said = []
    if ctx.untraced:
        names = "; ".join(f"{path!r} ({reason})" if path else f"the model itself, {cls} ({reason})"
                          for path, cls, reason in ctx.untraced)
        said.append(f"could not trace {names}. The norm->ReLU pairs their own forward makes (if "
                    "any) are left unfused; what is inside them and traces was fused.")
    if ctx.kept:
        names = "; ".join(
            f"{norm!r} (in the forward of {f'{path!r}, ' if path else ''}{cls}: {why})"
            for norm, (path, cls, why) in sorted(ctx.kept.items()))
        said.append(
            f"left unfused: {names}. Their ReLU is a function call or a module called "
            "elsewhere too: only a torch.fx GraphModule standing for the module whose forward "
            "makes the pair could drop it, and that module stays as it is.")
    if ctx.unsure:
        names = "; ".join(f"{p!r} ({cls})" for p, cls in ctx.unsure.items())
        said.append(
            f"left unfused: {names}, given the output of a module that may not return a "
            "tensor (a recurrent layer's tuple, or a module that does not trace), on whose "
            "type its forward could branch unseen by a trace; annotate such a module's forward "
            "'-> torch.Tensor' if it returns one.")
    if said:
        warnings.warn("convert(fuse_relu=True): " + " ".join(said), UserWarning, stacklevel=3)
    return result
