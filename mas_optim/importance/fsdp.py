r"""Ω on a model sharded by FSDP2 ``fully_shard``: each rank keeps the slice of Ω that matches
its slice of θ (Eq. 2 over the data of all ranks, reduce-scattered). :func:`compute_omega`
dispatches here for a model with DTensor parameters; :mod:`mas_optim.sharded` re-exports it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial

from .._validate import is_sharded
from .engine import omega_sums


def compute_omega_sharded(model: nn.Module, loader: Iterable, **kwargs: Any) -> Dict[str, Tensor]:
    r"""Ω (paper Eq. 2) of a model sharded by ``fully_shard``, each rank keeping its slice.

    .. math::
        \Omega = \frac{1}{\sum_r N_r} \sum_r \sum_{k \in \mathcal{D}_r}
            \left| \frac{\partial \lVert F(x_k) \rVert_2^2}{\partial \theta} \right|

    Every rank passes its own part :math:`\mathcal{D}_r` of the data (any number of batches
    and samples, also none). Each rank sums the per-sample magnitudes over its part
    (:func:`~mas_optim.importance.omega_sums`), the sums are reduce-scattered to the
    parameters' placements (each rank receives only its slice of the total) and divided by
    the sample count summed over the ranks. Parameters that are not sharded get the
    all-reduced total, as :func:`mas_optim.compute_omega` gives them.

    The pass needs every parameter whole. FSDP all-gathers a module's parameters at each of
    its forwards, a collective that would hang when ranks run different numbers of forwards
    (different batch counts, or the generic per-sample path, whose number of forwards depends
    on the number of samples). So the
    whole model is all-gathered once before the pass and FSDP is told not to reshard or
    reduce until it ends: the pass itself runs no collective. The price is one full copy of
    the parameters and of the fp32 sums on every rank for the duration of the pass; the
    parameters are resharded (and FSDP's settings restored) afterwards.

    Args:
        model: the network F, to whose root (or top-level modules) ``fully_shard`` was
            applied, in the same state on every rank.
        loader: this rank's batches, as for :func:`mas_optim.compute_omega`.
        **kwargs: ``per_sample``, ``method``, ... as for :func:`mas_optim.compute_omega`.

    Returns:
        ``{name: Ω}`` for every parameter with ``requires_grad``; a ``DTensor`` with the
        parameter's device mesh and placements where the parameter is one.

    Collective: every rank of the parameters' meshes (the whole default process group) must
    call it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("compute_omega_sharded needs an initialised torch.distributed "
                           "process group (the model's parameters are sharded over ranks)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("compute_omega: the model has no trainable parameters")
    world = dist.get_world_size()
    for name, p in params.items():
        if is_sharded(p) and p.device_mesh.size() != world:
            raise ValueError(
                f"compute_omega_sharded: parameter {name!r} is sharded over {p.device_mesh.size()} "
                f"ranks, the process group has {world}; every rank that passes data must hold a "
                "slice of each parameter (FSDP/HSDP over all ranks)")

    with _whole_parameters(model):
        for name, p in model.named_parameters():
            if p.requires_grad and is_sharded(p):
                raise ValueError(
                    f"compute_omega_sharded: parameter {name!r} is a DTensor that fully_shard "
                    "does not manage; only models sharded by fully_shard are supported")
        sums, count = omega_sums(model, loader, **kwargs)
    # Sample counts summed over the ranks: uneven parts give the true mean, not a mean of the
    # ranks' means. On the device of the sums (the unsharded parameters'), as NCCL needs.
    device = next(iter(sums.values())).device
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    n = int(total.item())
    if n == 0:
        raise ValueError("compute_omega: the loader yielded no samples (on any rank)")

    omega: Dict[str, Tensor] = {}
    for name, p in params.items():   # the same order on every rank: collectives pair up
        s = sums.pop(name)           # freed as soon as its slice exists
        if is_sharded(p):
            mesh = p.device_mesh
            # Every rank's sum is a partial of the total on every mesh dimension; going to the
            # parameter's placements is a reduce-scatter (Shard) or all-reduce (Replicate).
            s = DTensor.from_local(s, mesh, [Partial()] * mesh.ndim,
                                   run_check=False).redistribute(mesh, p.placements)
        else:
            dist.all_reduce(s)
        omega[name] = (s / n).to(p.dtype)   # Eq. 2: the mean over all ranks' samples
    return omega


@contextmanager
def _whole_parameters(model: nn.Module) -> Iterator[None]:
    """Every FSDP module of ``model`` unsharded (one all-gather each) and shown with its own
    class; no reshard or gradient reduction, hence no collective, until the block ends. Then
    everything is put back as it was, parameters resharded."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP fixes a root's settings at its first forward; fix them now, so that the values saved
    # below are the ones training runs with.
    for m in modules:
        m._get_fsdp_state()._lazy_init()
    # FSDP has setters for these settings but no getters: save the attributes the setters
    # write, to put back exactly what the user (or FSDP's defaults) chose.
    # fully_shard([a, b]) gives several modules one state: each state once.
    states = list({id(s): s for s in (m._get_fsdp_state() for m in modules)}.values())
    groups = [g for state in states for g in state._fsdp_param_groups]
    saved_auto = [state._auto_reshard_after_forward for state in states]
    saved = [(g.post_forward_mesh_info, g.reshard_after_backward, g.reduce_grads,
              g.all_reduce_grads) for g in groups]
    # fully_shard swaps a module's class for FSDP<class>, a subclass with the same forward. The
    # importance engine picks its exact rules by exact type (a subclass may change forward), so
    # for the pass each module shows its own class; FSDP's hooks belong to the module, not to
    # the class, and keep running.
    classes = [(m, type(m)) for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
            m.set_requires_gradient_sync(False, recurse=False)
            m.unshard()
        for m, cls in classes:
            m.__class__ = cls.__mro__[cls.__mro__.index(FSDPModule) + 1]
        yield
    finally:
        for m, cls in classes:
            m.__class__ = cls
        for g, (mesh_info, after_backward, reduce, all_reduce) in zip(groups, saved):
            g.post_forward_mesh_info = mesh_info
            g.reshard_after_backward = after_backward
            g.reduce_grads, g.all_reduce_grads = reduce, all_reduce
        for state, auto in zip(states, saved_auto):
            state._auto_reshard_after_forward = auto
        for m in modules:
            m.reshard()
