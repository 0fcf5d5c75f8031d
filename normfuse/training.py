"""Training helpers for BIN's gates, as the paper trains them: gates clipped to [0, 1] after
every optimizer step, a 10x learning rate and no weight decay."""
from __future__ import annotations

import torch
from torch import nn

from .modules import _BatchInstanceNorm


def _gates(module: nn.Module):
    return [m.gate for m in module.modules() if isinstance(m, _BatchInstanceNorm)]


def clip_gates_(module: nn.Module) -> nn.Module:
    """Clamp every BIN gate in ``module`` to [0, 1], in place; returns ``module``."""
    with torch.no_grad():
        for gate in _gates(module):
            gate.clamp_(0.0, 1.0)
    return module


def attach_gate_clipping(optimizer: torch.optim.Optimizer, module: nn.Module):
    """Clip ``module``'s gates after every ``optimizer.step()``; returns the hook handle
    (``handle.remove()`` detaches it)."""
    return optimizer.register_step_post_hook(lambda *_: clip_gates_(module))


def param_groups(module: nn.Module, lr: float, weight_decay: float | None = 0.0,
                 gate_lr_scale: float = 10.0) -> list[dict]:
    """Optimizer parameter groups: BIN gates at ``lr * gate_lr_scale`` with no weight decay,
    every other parameter at ``lr`` with ``weight_decay``.  Each parameter appears once.

    The groups carry their own weight decay, which overrides the optimizer's: pass the decay
    here (``param_groups(model, lr, weight_decay=0.05)``), not to the optimizer (the default
    0.0, issue 2's signature, would silently switch off AdamW's); ``weight_decay=None`` leaves
    the other parameters' group without one, so the optimizer's own applies."""
    gate_ids = {id(g) for g in _gates(module)}
    gates, others = [], []
    for p in module.parameters():  # parameters() yields each shared tensor once
        (gates if id(p) in gate_ids else others).append(p)
    groups = []
    if others:
        group = {"params": others, "lr": lr}
        if weight_decay is not None:  # (a group's own value overrides the optimizer's)
            group["weight_decay"] = weight_decay
        groups.append(group)
    if gates:
        groups.append({"params": gates, "lr": lr * gate_lr_scale, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def update_bn(loader, model: nn.Module, device=None) -> None:
    """``torch.optim.swa_utils.update_bn`` for models with normfuse layers: one pass over
    ``loader`` that recomputes the running statistics of every BIN / IEBN layer (their Sync
    forms included) and every ``nn.BatchNorm``, as the cumulative average over the batches
    (``momentum=None`` during the pass).  torch's own ``update_bn`` only sees subclasses of
    ``nn.modules.batchnorm._BatchNorm``, which normfuse's layers are not (so that
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` and BatchNorm-only code leave them alone): it
    would leave their statistics as they were, silently.  Batches as torch's: a tensor, or a
    list / tuple whose first element is the input; moved to ``device`` when given.  The
    train / eval mode of every module (a frozen layer, a Dropout left in eval) and every
    layer's momentum are restored (torch's restores the root's mode, on every module)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from .modules import _BatchStatsNorm
    momenta = {}
    for module in model.modules():
        if isinstance(module, (_BatchNorm, _BatchStatsNorm)) and module.track_running_stats:
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        for module in momenta:
            module.momentum = None
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        for module, training in modes:
            module.training = training
