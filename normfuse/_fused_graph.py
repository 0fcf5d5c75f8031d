"""The ``FusedGraphModule`` that ``convert(..., fuse_relu=True)`` (normfuse/fuse.py) puts in
place of a module whose forward makes a norm->ReLU pair the in-place path cannot fuse: when one
may stand for a module (``_not_replaceable``: what its class adds, what its forward does, checked
before tracing; ``_shallow_graph``: what a trace of its own forward shows), the graph of that
forward without the fused ReLUs (``_drop_relus``), and the GraphModule subclass that keeps what
the module held besides its code (its tree, hooks, attributes, class constants), through copies
and pickles."""
from __future__ import annotations

import copy
import dis
import inspect
import types

import torch
from torch import fx, nn

from ._fuse_trace import (_modes, _norm_calls, _relu_after, _relu_input, _trace, _Untraceable)


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
    return _global_reason(type(module).forward, "its forward", set())


# Modules whose functions compute from their arguments only: a forward may call them (torch's
# ops are recorded; math and the like on plain values give what the graph then holds, the same
# at every call).  Any other module (``random``, a config module) is refused, and numpy's
# ``random`` too.
_STATELESS_MODULES = frozenset(("torch", "math", "operator", "functools", "itertools", "typing",
                                "numbers", "warnings", "collections", "numpy", "builtins"))


def _code_objects(function):
    """``function``'s code and the code nested in it (lambdas, comprehensions, inner functions)."""
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        yield code


def _globals_loaded(function) -> set:
    """The global names ``function``'s code (and the code nested in it) loads as globals."""
    return {ins.argval for code in _code_objects(function) for ins in dis.get_instructions(code)
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str)}


def _root(module_name) -> str:
    return (module_name or "").partition(".")[0]


def _stateless_callable(value) -> bool:
    """A builtin, ufunc or method bound to nothing, to a class or to a stateless module
    (``math.sqrt``, ``torch.relu``, ``numpy.sqrt``); not one bound to an object holding state
    (``from random import random``: a method of the hidden ``Random`` instance)."""
    if not callable(value):
        return False
    owner = getattr(value, "__self__", None)
    if owner is None or isinstance(owner, type):
        return _root(getattr(value, "__module__", None)) in _STATELESS_MODULES or isinstance(
            value, types.BuiltinFunctionType)
    return isinstance(owner, types.ModuleType) and _root(owner.__name__) in _STATELESS_MODULES


def _global_reason(function, who: str, seen: set) -> str | None:
    """Why a graph could not follow the globals ``function`` loads (and the functions it calls
    load, but torch's own), or None: a plain value (held as it is), an object (a config
    ``Namespace`` or dict: its later changes would not reach the graph), or a module or
    function whose results may change from call to call (``random``, ``numpy.random``).
    Classes and stateless functions are fine."""
    if id(function) in seen:
        return None
    seen.add(id(function))
    globals_ = getattr(function, "__globals__", {})
    for name in sorted(_globals_loaded(function) & globals_.keys()):
        value = globals_[name]
        if isinstance(value, types.ModuleType):
            if _root(value.__name__) in _STATELESS_MODULES and not (
                    _root(value.__name__) == "numpy" and "random" in _names_read(function)):
                continue
            return (f"{who} uses the module {name!r}, whose results a graph would hold as "
                    "traced")
        if isinstance(value, _CONSTANT_TYPES):
            return f"{who} reads the global {name!r}, which a graph would hold as it is"
        if isinstance(value, types.FunctionType):
            if _root(value.__module__) in _STATELESS_MODULES:  # (torch.nn.functional's, numpy's)
                continue
            why = _global_reason(value, f"{who} calls {name!r}, which", seen)
            if why is not None:
                return why
            continue
        if isinstance(value, type) or _stateless_callable(value):
            continue
        return (f"{who} reads the global {name!r} ({type(value).__name__}), whose later "
                "changes a graph would not see")
    return None


def _submodule_value_read(owner: nn.Module) -> str | None:
    """Why a graph of ``owner``'s forward would hold a plain value of a submodule it reads
    (``self.head.temperature``: the graph holds the traced value, and setting it later changes
    nothing), or None.  Read from the bytecode: chains of attribute loads that start at the
    forward's ``self``; a chain the bytecode does not show plainly is not seen."""
    forward = type(owner).forward
    if not forward.__code__.co_varnames:
        return None
    me = forward.__code__.co_varnames[0]
    for code in _code_objects(forward):
        chain = None
        for ins in dis.get_instructions(code):
            value = ins.argval
            # (LOAD_FAST, LOAD_FAST_CHECK / _BORROW, LOAD_DEREF, and 3.13's LOAD_FAST_LOAD_FAST /
            # STORE_FAST_LOAD_FAST, whose argval pairs end with the name loaded)
            if ("LOAD_FAST" in ins.opname or ins.opname.startswith("LOAD_DEREF")) and (
                    value == me or isinstance(value, tuple) and value and value[-1] == me):
                chain = []
                continue
            if chain is not None and ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                chain.append(value)
                why = _plain_value_at(owner, chain)
                if why is not None:
                    return why
                continue
            chain = None
    return None


def _plain_value_at(owner: nn.Module, chain: list) -> str | None:
    obj, path = owner, []
    for name in chain[:-1]:
        child = obj._modules.get(name) if isinstance(obj, nn.Module) else None
        if child is None:
            return None
        obj, path = child, [*path, name]
    name = chain[-1]
    if not path or name in _MODULE_ATTRIBUTES or name not in vars(obj):
        return None  # owner's own (``_shallow_graph``), nn.Module's, or not a plain attribute
    value = vars(obj)[name]
    if isinstance(value, (nn.Module, torch.Tensor, types.FunctionType,
                          types.BuiltinFunctionType, types.MethodType)):
        return None
    return (f"its forward reads {'.'.join(path)}.{name} of a submodule, whose later changes a "
            "graph would not see")


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
    return {name for code in _code_objects(function) for name in code.co_names}


def _shallow_graph(owner: nn.Module, norms: set, guard):
    """The graph of ``owner``'s own forward (every submodule a leaf: their hooks still run, a
    replaced child stays a call), in which every call of the norms in ``norms`` (ids) is a pair
    (``_drop_relus`` takes the ReLUs out), its constants and the plain attributes of ``owner``
    it reads (their values are in the graph now); or the reason it cannot stand for the
    forward: grad mode or autocast set in it (traced with both on and off, every node records
    them), attributes it changes, buffers it updates in place, a mutable plain attribute it
    reads (later changes would not reach the graph).  ``guard``: the model's ``TensorGuard``."""
    leaves = {id(m): (m, n) for n, m in owner.named_modules() if m is not owner}
    kept = None
    for outer in ((torch.enable_grad, lambda: torch.autocast("cpu", enabled=False)),
                  (torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        with outer[0](), outer[1]():
            before = _modes()
            try:
                traced = _trace(owner, leaves, guard)
            except _Untraceable as exc:
                return f"its forward alone does not trace ({exc.reason})"
        graph, constants = traced.graph, traced.constants
        if any(node.meta.get("normfuse_modes", before) != before for node in graph.nodes):
            return "its forward sets grad mode or autocast, which a graph would not keep"
        if traced.changed:
            return "its forward changes attributes of modules, which a graph would not"
        if traced.updated:
            return ("its forward updates buffers or tensor attributes in place, which a graph "
                    "would not record")
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
    why = _submodule_value_read(owner)
    if why is not None:
        return why
    if any(_relu_after(node, owner) is None for node in _norm_calls(graph, owner, norms)):
        return "its forward alone makes another graph"
    return graph, constants, frozen


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
        # ... which names its per-instance class "GraphModule": the traced class's name again
        type(res).__name__ = type(self).__name__
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
