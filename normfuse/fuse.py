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
  attributes and reading no mutable ones nor a submodule's plain attributes
  (``_shallow_graph``), checking no types, checkpointing nothing and reading no globals but
  classes, functions and stateless modules, also in the functions it calls
  (``_graph_keeps_forward``)).  Else that module stays
  itself and the pair is left, named in the warning.  The plain values that forward reads
  (attributes, class constants) are in the graph: setting one on the GraphModule raises
  (``FusedGraphModule.__setattr__``).

Forwards are traced without their modules' hooks (``_Tracer.call_module``: a hook given a Proxy
could keep it or fail; the output of a module with hooks traced through gets a marker node,
``_hooked_output``, so no pair passes through what a hook may change), and reading a real tensor's value (``bool``, ``item``) while tracing
fails the trace (``_tensor_values_unreadable``: the branch or number would be frozen).
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

import warnings

from torch import fx, nn

from ._fuse_trace import (NORM_TYPES, TensorGuard, _owner, _plain_relu, _relu_after, _trace,
                          _Tracer, _Untraceable)
from ._fused_graph import (FusedGraphModule, _drop_relus, _graph_module, _not_replaceable,
                           _one_trace_fits, _restore, _shallow_graph)
from .modules import _has_hooks
from .norm_act import _NormAct, plain_identity

# A model pickled before these moved to _fuse_trace.py / _fused_graph.py names them as this
# module's: FusedGraphModule's rebuild (_restore) and the tracer class a pickled GraphModule
# records (_Tracer). Kept importable from here, so that such a file still loads.
__all__ = ["fuse_relu", "FusedGraphModule", "NORM_TYPES", "_Tracer", "_restore"]


def _under(path: str, prefix: str) -> bool:
    return not prefix or path.startswith(prefix + ".")


class _Context:
    def __init__(self, root: nn.Module):
        self.root = root
        self.guard = TensorGuard(root)  # puts back what a forward updates while traced
        # Every path of every module object (a module may sit at several).
        self.paths = {}
        for name, m in root.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), []).append(name)
        self.untraced = []  # (path, class name, reason)
        self.kept = {}  # norm path -> (path, class, why) of the module whose forward has its pair
        self.done = set()  # ids of the modules fused (and of what replaced them)
        self.unsure = {}  # path -> class of modules left alone: given what may not be a tensor
        self.hooked = {}  # norm path -> "the norm" / "its ReLU": a pair left unfused for hooks
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
        if _has_hooks(norm):  # its hooks would see relu(norm(x)) where they saw norm(x)
            if all(relu is not None for _, relu in calls):
                ctx.hooked[_path_of(norm, ctx, path)] = "the norm"
            continue
        if any(relu is None for _, relu in calls):
            if any(_hooked_relu(node, module) for node, _ in calls):  # (they would no longer run)
                ctx.hooked[_path_of(norm, ctx, path)] = "its ReLU"
            continue  # a call site whose output has another user, or goes elsewhere
        if not ctx.in_reach(norm, path, leaf_paths):
            continue
        out[key] = (norm, calls)
    return out


def _path_of(m: nn.Module, ctx: _Context, path: str) -> str:
    """A path of ``m`` in the model, for messages."""
    return (ctx.paths.get(id(m)) or [path or "the model itself"])[0]


def _hooked_relu(node: fx.Node, module: nn.Module) -> bool:
    """Whether the one user of ``node`` is an ``nn.ReLU`` module with hooks."""
    if len(node.users) != 1:
        return False
    (user,) = node.users
    if user.op != "call_module":
        return False
    relu = module.get_submodule(user.target)
    return type(relu) is nn.ReLU and _has_hooks(relu)


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
            traced = _trace(module, opaque, ctx.guard)
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
            traced = _trace(module, trial, ctx.guard)
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
            shallow = _shallow_graph(module.get_submodule(rel), owners[rel], ctx.guard)
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
    if ctx.hooked:
        names = "; ".join(f"{p!r} ({who} has hooks)" for p, who in sorted(ctx.hooked.items()))
        said.append(f"left unfused: {names}. Fused, a norm's hooks would see relu(norm(x)) and a "
                    "ReLU's would no longer run.")
    if said:
        warnings.warn("convert(fuse_relu=True): " + " ".join(said), UserWarning, stacklevel=3)
    return result
