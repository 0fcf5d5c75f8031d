"""``convert(..., fuse_relu=True)``: fuse each normfuse norm whose output goes only into a ReLU.

The model is traced with ``torch.fx`` (normfuse norms kept as leaves).  In the graph, a norm
call site whose only user is a ReLU (``nn.ReLU``, ``torch.relu``/``relu_``, ``F.relu`` with or
without ``inplace``, ``Tensor.relu``/``relu_``), directly or through plain ``nn.Identity``
calls, is a pair; a norm module is fused when every one of its call sites is such a pair: its
``activation`` becomes ``"relu"`` and those ReLU calls go.  How they go:

* An ``nn.ReLU`` module called only at such pairs becomes an ``nn.Identity`` where it sits: the
  module keeps its class, its own forward and everything else it has.
* A ReLU that is a function call, or a module also called elsewhere (torchvision's blocks call
  one ``self.relu`` after ``bn1``, ``bn2`` and the residual add), needs the graph without that
  node: the module is replaced by a ``FusedGraphModule`` of its traced forward, where one can
  stand for it (``_graph_replaceable``: a class adding to nn.Module only ``__init__``,
  ``forward`` and constants).  A module with methods or properties of its own (a model class
  with ``reset_classifier``, a ``train`` override, nn.Sequential) stays itself: its children
  are traced and fused on their own, and the pairs only its graph could fuse are left and
  reported.  fx nodes are call sites, so in a GraphModule only the fused call sites go.

Modules whose forward cannot be traced (data-dependent control flow, or a forward that differs
between train and eval mode, which a graph would freeze) are kept as leaves of the graph around
them, their children are fused on their own, and they are reported together in one warning.

A norm + act module (``normfuse.norm_act``, what convert makes of timm's ``BatchNormAct2d`` /
``GroupNormAct``) whose ``act`` is a plain ``nn.ReLU`` takes it in as its ``activation`` first,
without tracing; one with another ``act`` (or ``drop``) is never fused with a ReLU after it.

Relu is idempotent, so a fused norm followed by a ReLU that still runs (in an original
``forward`` that a GraphModule replaced, say) computes what it computed before: a module
replaced by a GraphModule still computes the same function.

A norm is fused only where every place it sits (a module may be registered under several
names) is inside the traced graph and outside the modules kept as leaves, whose forward could
call it unseen.  Not detected: an untraceable module's forward calling a norm of a traceable
child directly (``self.block.bn(x)``, bypassing ``self.block``); that call would get the ReLU.
"""
from __future__ import annotations

import copy
import itertools
import warnings

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

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, NORM_TYPES) or id(m) in self.opaque
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost call catches it first
                try:
                    self.failed = (m, self.path_of_module(m))
                except Exception:
                    self.failed = False  # not a submodule: no culprit to keep as a leaf
            raise


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _owner(node: fx.Node) -> str:
    """Path of the module whose forward created ``node`` ("" for the traced module itself)."""
    stack = [qualname for qualname, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


def _common_path(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _trace(module: nn.Module, opaque: dict):
    """``module``'s graph, traced in train and in eval mode (which must agree: a graph freezes
    the branches a forward takes on ``self.training``); raises ``_Untraceable``.  Returns the
    graph and the tensor constants it reads (attributes of ``module`` the trace set; removed
    from ``module`` again)."""
    modes = [(m, m.training) for m in module.modules()]
    before = set(vars(module))

    def take_constants():  # the attributes a trace set on ``module``, removed from it
        taken = {name: vars(module)[name] for name in set(vars(module)) - before}
        for name in taken:
            delattr(module, name)
        return taken

    graphs = []
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
    finally:
        for m, training in modes:
            m.training = training
        constants = take_constants()
    for a, b in itertools.zip_longest(graphs[0].nodes, graphs[1].nodes):
        if a is None or b is None or a.format_node() != b.format_node():
            # The branch is in the forward of the module that created one of the two nodes.
            paths = dict.fromkeys(_owner(n) for n in (a, b) if n is not None)
            raise _Untraceable("its forward depends on train/eval mode (self.training)",
                               [(module.get_submodule(p), p) for p in paths if p],
                               certain=False)
    return graphs[1], constants


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
        self.kept = {}  # norm path -> (path, class name) of the module whose pair it is
        self.done = set()  # ids of the modules fused (and of what replaced them)

    def in_reach(self, m: nn.Module, path: str, opaque_paths) -> bool:
        """Whether every place ``m`` sits is under ``path`` and outside the modules kept as
        leaves (whose forward may call it unseen)."""
        return all(_under(p, path) and not any(_under(p, o) for o in opaque_paths)
                   for p in self.paths.get(id(m), []))


def _relu_after(node: fx.Node, module: nn.Module):
    """The ReLU node that is the only user of ``node``, directly or through plain
    ``nn.Identity`` calls that are each other's only users (timm's blocks call a ``drop_block``
    between norm and ReLU, an Identity unless drop-block is on), else None."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _relu_input(user, module) is node:
            return user
        if user.op != "call_module" or not plain_identity(module.get_submodule(user.target)):
            return None
        node = user
    return None


def _candidates(graph: fx.Graph, module: nn.Module, path: str, opaque_paths, ctx) -> dict:
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
            continue  # fused already (a timm norm + act's own ReLU, or another trace's)
        if isinstance(norm, _NormAct) and not norm._post_is_identity():
            continue  # relu(act(norm(x))): the ReLU comes after its own drop / act
        if _has_hooks(norm):
            continue  # its hooks would see relu(norm(x)) where they saw norm(x)
        if any(relu is None for _, relu in calls):
            continue  # a call site whose output has another user, or goes elsewhere
        if not ctx.in_reach(norm, path, opaque_paths):
            continue
        out[key] = (norm, calls)
    return out


def _by_identity(candidates: dict, graph: fx.Graph, module: nn.Module, path: str,
                 opaque_paths, ctx) -> dict:
    """The candidates whose every ReLU is an ``nn.ReLU`` module called only after candidates
    and sitting only in reach: replacing those modules by ``nn.Identity`` fuses the pairs
    without a graph.  (Removing a norm can take a ReLU module's last excuse away: repeated
    until nothing changes.)"""
    calls_of = {}  # id(ReLU module) -> its call nodes in the graph
    leaves = list(opaque_paths)  # a ReLU inside a leaf (a timm norm + act's act) is called unseen
    for node in graph.nodes:
        if node.op == "call_module":
            leaves.append(f"{path}.{node.target}" if path else node.target)
            if _plain_relu(module.get_submodule(node.target)):
                calls_of.setdefault(id(module.get_submodule(node.target)), []).append(node)
    chosen = dict(candidates)
    while True:
        pair_relus = {relu for _, calls in chosen.values() for _, relu in calls}
        removable = {
            key for key, nodes in calls_of.items()
            if all(n in pair_relus for n in nodes)
            and ctx.in_reach(module.get_submodule(nodes[0].target), path, leaves)}
        keep = {key: (norm, calls) for key, (norm, calls) in chosen.items()
                if all(relu.op == "call_module"
                       and id(module.get_submodule(relu.target)) in removable
                       for _, relu in calls)}
        if len(keep) == len(chosen):
            return keep
        chosen = keep


def _fuse_by_identity(chosen: dict, module: nn.Module, ctx) -> None:
    """Fuse the pairs of ``chosen`` (from ``_by_identity``): each norm takes the ReLU, each of
    their ReLU modules becomes an ``nn.Identity`` wherever it sits."""
    relus = {}
    for norm, calls in chosen.values():
        norm.activation = "relu"
        for _, relu in calls:
            m = module.get_submodule(relu.target)
            relus[id(m)] = m
    for key in relus:
        for p in ctx.paths.pop(key, []):
            parent, _, name = p.rpartition(".")
            identity = nn.Identity()
            setattr(ctx.root.get_submodule(parent), name, identity)
            ctx.paths.setdefault(id(identity), []).append(p)


def _fuse_in_graph(candidates: dict, graph: fx.Graph) -> None:
    """Fuse every pair of ``candidates`` in ``graph``: the norms take the ReLU, the ReLU nodes
    go (their users take the norm's output)."""
    for norm, calls in candidates.values():
        norm.activation = "relu"
        for _, relu in calls:
            relu.replace_all_uses_with(relu.args[0] if relu.args else relu.kwargs["input"])
            graph.erase_node(relu)
    graph.lint()


# What a class may add to nn.Module and still be stood for by a GraphModule (besides class-level
# constants): a GraphModule runs the traced forward and carries the object's attributes.
_GRAPH_REPLACEABLE = {"__init__", "forward", "extra_repr", "__module__", "__qualname__", "__doc__",
                      "__dict__", "__weakref__", "__annotations__", "__constants__",
                      "__firstlineno__", "__static_attributes__", "__classcell__",
                      "__orig_bases__", "__parameters__", "__annotate__", "__annotate_func__",
                      "__annotations_cache__"}
_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
_MODULE_NAMES = frozenset(dir(nn.Module))


def _graph_replaceable(cls: type) -> bool:
    """Whether a GraphModule may stand for an instance of ``cls``: a class that adds to
    nn.Module only ``__init__``, ``forward``, ``extra_repr`` and class-level constants
    (torchvision's BasicBlock and Bottleneck, a user's block).  Methods or properties of its own
    (timm's ``reset_classifier``, a ``train`` that keeps BatchNorms frozen, nn.Sequential's
    indexing) a GraphModule would not have, or would have as nn.Module's: such a module stays
    what it is."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for name, value in vars(klass).items():
            if name in _GRAPH_REPLACEABLE:
                continue
            if (name in _MODULE_NAMES or name.startswith("__")
                    or not isinstance(value, _CONSTANT_TYPES)):
                return False
    return True


def _fuse_children(module: nn.Module, path: str, ctx) -> None:
    for name, child in list(module.named_children()):
        new = _fuse_module(child, f"{path}.{name}" if path else name, ctx)
        if new is not child:
            setattr(module, name, new)


def _fuse_module(module: nn.Module, path: str, ctx) -> nn.Module:
    """``_fuse_one`` once per module object (a module kept as a leaf is fused before the graph
    around it, whose children may be visited again)."""
    if id(module) in ctx.done:
        return module
    result = _fuse_one(module, path, ctx)
    ctx.done.update((id(module), id(result)))
    return result


def _fuse_one(module: nn.Module, path: str, ctx) -> nn.Module:
    """``module`` with its pairs fused.  Pairs whose ReLU is a module called only there are
    fused in place (the ReLU module becomes ``nn.Identity``) and ``module`` comes back; where a
    pair needs the graph (a functional ReLU, a ReLU module also called elsewhere), a
    GraphModule of ``module`` comes back if one may stand for it (``_graph_replaceable``), else
    ``module`` with its children fused on their own and the rest left (``ctx.kept``)."""
    if isinstance(module, NORM_TYPES) or not any(isinstance(m, NORM_TYPES)
                                                 for m in module.modules()):
        return module
    opaque = {}  # id -> (submodule, path in module): kept as leaves
    guessed = []  # the ones a train/eval difference pointed at, perhaps wrongly
    while True:
        try:
            graph, constants = _trace(module, opaque)
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
            graph, constants = _trace(module, trial)
        except _Untraceable:
            continue
        opaque = trial
    opaque_paths = []
    for sub, sub_path in opaque.values():
        full = f"{path}.{sub_path}" if path else sub_path
        opaque_paths.append(full)
        new = _fuse_module(sub, full, ctx)
        if new is not sub:
            parent, _, name = sub_path.rpartition(".")
            setattr(module.get_submodule(parent), name, new)
    candidates = _candidates(graph, module, path, opaque_paths, ctx)
    if not candidates:
        return module
    chosen = _by_identity(candidates, graph, module, path, opaque_paths, ctx)
    if len(chosen) < len(candidates) and _graph_replaceable(type(module)):
        _fuse_in_graph(candidates, graph)
    else:  # the module stays itself; its children may fuse the rest in their own graphs
        _fuse_by_identity(chosen, module, ctx)
        if len(chosen) < len(candidates):
            _fuse_children(module, path, ctx)
            for key, (norm, _) in candidates.items():
                if key not in chosen and norm.activation is None:
                    for p in ctx.paths.get(key, []):
                        ctx.kept.setdefault(p, (path, type(module).__name__))
        return module
    for name, value in constants.items():  # for the GraphModule to take
        setattr(module, name, value)
    try:
        return FusedGraphModule(module, graph, type(module).__name__)
    finally:
        for name in constants:
            delattr(module, name)


def _adopt(gm: nn.Module, modules: dict, parameters: dict, buffers: dict, non_persistent) -> None:
    """Give ``gm`` the traced module's whole tree, parameters and buffers (GraphModule keeps
    only what its graph references, under placeholder parents): same state_dict keys, in the
    same order, and the same submodule objects as the input model."""
    constants = {k: v for k, v in gm._buffers.items() if k not in buffers}
    gm.__dict__["_modules"] = dict(modules)
    gm.__dict__["_parameters"] = dict(parameters)
    gm.__dict__["_buffers"] = dict(buffers)
    gm.__dict__["_non_persistent_buffers_set"] = set(non_persistent)
    for name, value in constants.items():  # tensor constants of the trace: plain attributes
        setattr(gm, name, value)


class FusedGraphModule(fx.GraphModule):
    """A ``torch.fx.GraphModule`` that keeps what the traced module object held besides the
    graph's code: its whole module tree (the same submodule objects, parameters and buffers, so
    the same ``state_dict`` keys), its hooks, its plain attributes and its class's constants
    (``_keep_own``), also through ``copy.deepcopy`` and ``torch.save``.  It stands only for
    modules whose class adds no methods or properties to nn.Module (``_graph_replaceable``)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        _adopt(self, root._modules, root._parameters, root._buffers,
               root._non_persistent_buffers_set)
        _keep_own(self, vars(root), type(root), bound_to=root)
        self.training = root.training

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)  # rebuilt from a deep copy of self.__dict__ ...
        state = copy.deepcopy(self.__dict__, memo)  # ... which the memo holds: the same copies
        _adopt(res, state["_modules"], state["_parameters"], state["_buffers"],
               state["_non_persistent_buffers_set"])
        _keep_own(res, state)  # (GraphModule's __deepcopy__ runs GraphModule.__init__)
        res.training = self.training
        return res

    def __copy__(self):  # (GraphModule's: a plain GraphModule of what its code references;
        # nn.DataParallel's replicas are such copies)
        res = FusedGraphModule(self, self.graph, type(self).__name__)
        res.meta = getattr(self, "meta", {})
        return res

    def __reduce__(self):
        # GraphModule pickles its __dict__ (in the arguments of its rebuild, so a hook bound to
        # the module itself would recurse: _SelfBound stands for that binding) and its code,
        # and comes back as a plain GraphModule holding what the code references; _restore
        # gives it the rest back.
        rebuild, (body, *rest) = super().__reduce__()
        for name in _HOOK_DICTS:
            if isinstance(body.get(name), dict):
                body[name] = _rebind(body[name], self, _SelfBound)
        return _restore, (rebuild, (body, *rest))


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
    (``Bottleneck.expansion``; ``_graph_replaceable`` allows no other class attributes)."""
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
    _adopt(loaded, body["_modules"], body["_parameters"], body["_buffers"],
           body["_non_persistent_buffers_set"])
    for name in _HOOK_DICTS:
        if name in body:
            loaded.__dict__[name] = body[name]
    return FusedGraphModule(loaded, loaded.graph, type(loaded).__name__)


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
        said.append(f"could not trace {names}. Their forward's norm->ReLU pairs are left "
                    "unfused (plain conversions); what is inside them and traces was fused.")
    if ctx.kept:
        names = "; ".join(f"{norm!r} (in the forward of {f'{path!r}, ' if path else ''}{cls})"
                          for norm, (path, cls) in sorted(ctx.kept.items()))
        said.append(
            f"left unfused: {names}. Its ReLU is a function call or a module called elsewhere "
            "too, which only a torch.fx GraphModule standing for that module could drop, and "
            "its class has methods or properties of its own (a GraphModule would not have "
            "them), so it stays as it is.")
    if said:
        warnings.warn("convert(fuse_relu=True): " + " ".join(said), UserWarning, stacklevel=3)
    return result
