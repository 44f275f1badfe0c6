"""Growing parameters: reg_params for a model whose layers got larger (class-incremental heads).

In class-incremental learning one output layer covers every class seen so far, so it gains rows
when a task brings new classes. Its reg_params entry must grow with it: the old rows keep the
importance Ω they earned and their anchor θ*, the new rows start unimportant (Ω = 0) and
anchored at their current value, so the penalty neither pulls on them nor fails on a shape::

    head = torch.nn.Linear(width, old_classes + new_classes)  # old rows copied in
    reg_params = mas_optim.grow_reg_params(reg_params, model)
    optimizer = mas_optim.LocalSgd(model.named_parameters(), reg_params=reg_params, ...)

Build the optimizer after growing: an optimizer holds the parameter objects it was given.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

RegParams = Dict[str, Dict[str, torch.Tensor]]

__all__ = ["grow_reg_params"]


def grow_reg_params(reg_params: RegParams, model: nn.Module) -> RegParams:
    """reg_params fitted to ``model`` whose parameters may have grown since they were built.

    For every entry whose parameter in ``model`` is larger along some dimensions (same number
    of dimensions, no dimension smaller), the old values fill the leading block
    (``new[:d0, :d1, ...]``, where old rows and columns stay in a grown ``nn.Linear``) and the
    rest is Ω = 0, θ* = the parameter's current value. Entries whose shape already fits are
    kept as they are (the same tensors).

    Args:
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}`` of the model before it grew.
        model: the grown model (not sharded: grow before ``fully_shard``).

    Returns:
        a new dict with the same names; grown entries are new tensors on the parameter's device
        and in its dtype.

    Raises:
        KeyError: an entry names no parameter of ``model``.
        ValueError: a parameter shrank or changed its number of dimensions, Ω and θ* of an
            entry differ in shape, or the parameter is sharded (a DTensor).
    """
    named = dict(model.named_parameters())
    grown: RegParams = {}
    for name, entry in reg_params.items():
        if name not in named:
            raise KeyError(f"reg_params has {name!r}, which the model does not have")
        p = named[name]
        old_omega, old_init = entry["omega"], entry["init_val"]
        if old_omega.shape != old_init.shape:
            raise ValueError(f"reg_params[{name!r}]: omega is {tuple(old_omega.shape)}, "
                             f"init_val {tuple(old_init.shape)}")
        if old_omega.shape == p.shape:
            grown[name] = entry
            continue
        if type(p.data) is not torch.Tensor:
            raise ValueError(f"{name} is a {type(p.data).__name__}: grow reg_params before "
                             "sharding the model")
        if old_omega.dim() != p.dim() or any(o > n for o, n in zip(old_omega.shape, p.shape)):
            raise ValueError(f"{name} went from {tuple(old_omega.shape)} to {tuple(p.shape)}: "
                             "reg_params can follow a parameter that grows, not one that "
                             "shrinks or changes its number of dimensions")
        block = tuple(slice(0, size) for size in old_omega.shape)
        omega = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
        init = p.detach().clone(memory_format=torch.contiguous_format)
        omega[block] = old_omega.to(omega)
        init[block] = old_init.to(init)
        # a copy of the entry keeps its own key objects: a pickle of the result is then byte
        # for byte that of an entry that never grew (pickle memoises by identity)
        grown[name] = dict(entry)
        grown[name]["omega"], grown[name]["init_val"] = omega, init
    return grown
