"""``convert(..., fuse_relu=True)``: fuse each normfuse norm whose output goes only into a ReLU.

The model is traced with ``torch.fx`` (normfuse norms kept as leaves).  In the graph, a norm
call site whose only user is a ReLU (``nn.ReLU``, ``torch.relu``/``relu_``, ``F.relu`` with or
without ``inplace``, ``Tensor.relu``/``relu_``) is a pair; a norm module is fused when every one
of its call sites is such a pair: its ``activation`` becomes ``"relu"`` and those ReLU nodes go
(their users take the norm's output).  fx nodes are call sites, so one ``nn.ReLU`` module called
after several norms and after a residual add (torchvision's blocks) is no obstacle: the fused
call sites go, the others stay.

Modules whose forward cannot be traced (data-dependent control flow, or a forward that differs
between train and eval mode, which a graph would freeze) are kept as leaves of the graph around
them, their children are fused on their own, and they are reported together in one warning.

A norm + act module (``normfuse.norm_act``, what convert makes of timm's ``BatchNormAct2d`` /
``GroupNormAct``) whose ``act`` is a plain ``nn.ReLU`` takes it in as its ``activation`` first,
without tracing; one with another ``act`` (or ``drop``) is never fused with a ReLU after it.

Relu is idempotent, so a fused norm followed by a ReLU that still runs (in an original
``forward`` that is no longer called, say) computes what it computed before: the input model,
whose norms are fused in place, still computes the same function; the returned GraphModule
runs without the redundant ReLU passes.

A norm is fused only where every place it sits (a module may be registered under several
names) is inside the traced graph and outside the modules kept as leaves, whose forward could
call it unseen.  Not detected: an untraceable module's forward calling a norm of a traceable
child directly (``self.block.bn(x)``, bypassing ``self.block``); that call would get the ReLU.
"""
from __future__ import annotations

import copy
import inspect
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
        # Every path of every module object (a module may sit at several).
        self.paths = {}
        for name, m in root.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), []).append(name)
        self.untraced = []  # (path, class name, reason)


def _fuse_graph(graph: fx.Graph, module: nn.Module, path: str, opaque_paths, ctx) -> int:
    """Fuse the pairs in ``graph`` (of ``module``, at ``path`` in the model); the count."""
    sites = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        norm = module.get_submodule(node.target)
        if not isinstance(norm, NORM_TYPES):
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and _relu_input(users[0], module) is node else None
        sites.setdefault(id(norm), (norm, []))[1].append((node, relu))
    fused = 0
    for norm, calls in sites.values():
        if getattr(norm, "activation", None) not in (None, "relu"):
            continue
        if isinstance(norm, _NormAct) and not norm._post_is_identity():
            continue  # relu(act(norm(x))): the ReLU comes after its own drop / act
        if _has_hooks(norm):
            continue  # its hooks would see relu(norm(x)) where they saw norm(x)
        if any(relu is None for _, relu in calls):
            continue  # a call site whose output has another user, or goes elsewhere
        # Every place the norm sits must be in this graph's reach: under ``path`` and not
        # inside a module kept as a leaf, whose forward may call it unseen.
        norm_paths = ctx.paths.get(id(norm), [])
        if not all(_under(p, path) and not any(_under(p, o) for o in opaque_paths)
                   for p in norm_paths):
            continue
        norm.activation = "relu"
        for node, relu in calls:
            relu.replace_all_uses_with(node)
            graph.erase_node(relu)
        fused += 1
    graph.lint()
    return fused


def _fuse_children(module: nn.Module, path: str, ctx) -> None:
    for name, child in list(module.named_children()):
        new = _fuse_module(child, f"{path}.{name}" if path else name, ctx)
        if new is not child:
            setattr(module, name, new)


def _fuse_module(module: nn.Module, path: str, ctx) -> nn.Module:
    """``module`` with its pairs fused: a GraphModule when it traces and a pair was fused, else
    ``module`` (its children fused where they trace)."""
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
    if not _fuse_graph(graph, module, path, opaque_paths, ctx):
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
    the same ``state_dict`` keys), its hooks and its plain attributes (``_keep_own``), also
    through ``copy.deepcopy`` and ``torch.save``.  Its class's other methods and properties it
    cannot run (a method could change what the graph froze): asking for one says so."""

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

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)  # submodules, parameters, buffers
        except AttributeError:
            traced = self.__dict__.get(_TRACED_CLASS)
            if traced is None or name not in traced[1]:
                raise
        raise AttributeError(
            f"{traced[0]}.{name} is not available on the model convert(..., fuse_relu=True) "
            f"returned: a torch.fx GraphModule that runs {traced[0]}'s traced forward and keeps "
            "its modules, parameters, buffers, attributes and hooks, not its class's other "
            f"methods and properties. Use {name} on the model before convert(..., "
            "fuse_relu=True), or convert without fuse_relu.")


# nn.Module's hook dictionaries (forward, backward, state_dict, load_state_dict hooks) and
# flags (_is_full_backward_hook).
_HOOK_DICTS = tuple(name for name in vars(nn.Module()) if "hook" in name)
# Attribute of a FusedGraphModule: (the traced class's name, its attributes the GraphModule
# lacks), for FusedGraphModule.__getattr__'s message.
_TRACED_CLASS = "_normfuse_traced_class"
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
    module, bound to ``bound_to``, are bound to ``gm``) and its plain attributes (the same
    objects: timm's ``num_classes`` and ``pretrained_cfg``, which
    ``timm.data.resolve_data_config`` reads, say) and those of its class ``cls``.  The methods
    and properties of ``cls`` stay behind, named for ``__getattr__``'s message (a copy of a
    FusedGraphModule has their names in ``own`` already)."""
    for name in _HOOK_DICTS:
        if name in own:
            value = own[name]
            gm.__dict__[name] = _rebind(value, bound_to, gm) if isinstance(value, dict) else value
    gm_class = type(gm)
    for name, value in own.items():
        if name not in gm.__dict__ and not hasattr(gm_class, name):
            gm.__dict__[name] = value
    if _TRACED_CLASS not in own:
        missing = [name for name in dir(cls) if not hasattr(gm_class, name)]
        for name in missing:  # class-level data (torchvision's Bottleneck.expansion, say)
            value = inspect.getattr_static(cls, name)
            if not hasattr(value, "__get__"):  # not a method, property or other descriptor
                gm.__dict__.setdefault(name, value)
        gm.__dict__[_TRACED_CLASS] = (cls.__name__, frozenset(
            name for name in missing if name not in gm.__dict__))


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
    if ctx.untraced:
        names = "; ".join(f"{path!r} ({reason})" if path else f"the model itself, {cls} ({reason})"
                          for path, cls, reason in ctx.untraced)
        warnings.warn(
            f"convert(fuse_relu=True): could not trace {names}. Their forward's norm->ReLU "
            "pairs are left unfused (plain conversions); what is inside them and traces was "
            "fused.", UserWarning, stacklevel=3)
    return result
