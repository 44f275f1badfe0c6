"""``train.py --fsdp``: the task model sharded by FSDP2's ``fully_shard``, and its run state.

Under ``torchrun`` with ``--fsdp`` every parameter of the model being trained is a ``DTensor``:
each rank holds one slice (``Shard(0)`` over all ranks), and so do LocalSgd's momentum buffers
and the reg_params Omega and theta* (``mas_optim.init_reg_params`` /
``mas_optim.consolidate_reg_params`` on the sharded model give them sliced like the
parameters; ``mas_optim.compute_omega`` gives each rank its slice of Omega). What the
application adds, here:

* :func:`shard_task_model`: which modules become ``fully_shard`` units;
* :func:`full_state`, :func:`full_optimizer_state`: the run state (weights, heads, reg_params,
  optimizer) as full, plain CPU tensors on *every* rank, in exactly the format of a run without
  ``--fsdp``: a checkpoint does not depend on the number of ranks nor on ``--fsdp``, every rank
  keeps the same ``RunState`` (so ``Dist.check_same`` still compares the ranks), and rank 0
  writes it as always;
* :func:`shard_optimizer_state_like`: a full optimizer state dict cut to this rank's slices,
  for ``optimizer.load_state_dict`` on a freshly sharded model;
* :func:`even_batches`: evaluation batches padded so that every rank runs as many forwards
  (each forward of a sharded model all-gathers, a collective);
* :func:`all_finite`: the divergence checks over all ranks' slices (the same verdict on every
  rank; ``LocalSgd.penalty()`` already sums over the ranks).

Restoring a model is done before sharding: build it, ``load_part`` the full tensors of the
checkpoint (every rank has read the same file), then :func:`shard_task_model`, which keeps each
rank's slice of its own full copy -- no communication, so the slices are bit-identical to those
the state was gathered from. (``torch.distributed.checkpoint.state_dict.set_model_state_dict``
on an already sharded model would scatter rank 0's copy instead; ``get_model_state_dict`` with
``full_state_dict=True, cpu_offload=True`` returns the tensors on rank 0 only, and without
``cpu_offload`` keeps every full tensor on the device at once: :func:`full_state` gathers one
tensor at a time to the CPU of every rank.)

Heads: the head of the task being trained is part of the model when it is sharded (the trainer
builds and shards one model per task), so it is sharded and trained like the backbone. The heads
of earlier tasks are only evaluated: they stay plain modules (a few thousand parameters, the
same full copy on every rank), swapped in for the evaluation without gradients; the shared
backbone's units still all-gather at each forward, hence :func:`even_batches`.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from model_class import TaskModel

# Ω and θ* in the state dict of mas_optim's optimizers (docs/speed.md, "The penalty in the
# optimizer's checkpoint")
MAS_STATE_KEYS = ("mas_omega", "mas_init_val")

__all__ = ["MAS_STATE_KEYS", "all_finite", "even_batches", "full_optimizer_state", "full_state",
           "shard_optimizer_state_like", "shard_task_model"]


def shard_task_model(model: TaskModel, device: torch.device) -> TaskModel:
    """Shard ``model`` in place with ``fully_shard`` over all ranks of the default process
    group (a 1-D mesh on ``device``'s type) and return it.

    Units: every module of ``model.shared`` that holds parameters itself (each Conv2d, Linear,
    BatchNorm: one layer's weights are whole on a device only while that layer runs), the head,
    and the root (which then holds no parameters of its own). Frozen layers
    (``requires_grad=False``) are sharded too; FSDP reduces no gradient for them.

    Call it after the full weights are loaded and the layers frozen, and build the optimizer and
    reg_params afterwards: ``fully_shard`` replaces every parameter by a new ``DTensor`` one.
    The parameters are moved to ``device`` unit by unit as they are sharded, so do not move the
    whole model there first. Collective only in that every rank must shard the same model.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_task_model needs an initialised torch.distributed process "
                           "group (start train.py --fsdp under torchrun)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Children before parents: fully_shard(parent) manages only what no unit below it has.
    for module in list(model.shared.modules()):
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full, plain CPU copies of ``tensors`` (a state dict such as ``model.part_state("shared")``
    or a reg_params entry), each a new tensor: a ``DTensor`` is gathered from the ranks'
    slices, a plain tensor copied.

    Collective when any tensor is a ``DTensor``: every rank calls it with the same names in the
    same order, and every rank receives the same full tensors. Only one full tensor is on the
    device at a time.
    """
    return {name: _full_cpu(t) for name, t in tensors.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every tensor a full, plain CPU copy: what
    ``optimizer.state_dict()`` of the same optimizer without FSDP would hold (LocalSgd's
    momentum buffers and path-integral tensors, keyed by parameter index, with the
    ``param_names`` of each group), less the Ω and θ* the MAS penalty keeps in the optimizer's
    state (``MAS_STATE_KEYS``): the run state holds them once, as its reg_params, and the
    optimizer of a resumed task is built with those.

    Collective when the optimizer holds ``DTensor`` state (a sharded model's): every rank calls
    it; each receives the same full state.
    """
    saved = optimizer.state_dict()
    # Sorted: every rank gathers the same tensors in the same order, so the collectives pair up.
    state = {index: {key: _full_cpu(v) if isinstance(v, Tensor) else v
                     for key, v in sorted(entry.items()) if key not in MAS_STATE_KEYS}
             for index, entry in sorted(saved["state"].items())}
    return {"state": {i: entry for i, entry in state.items() if entry},
            "param_groups": saved["param_groups"]}


def shard_optimizer_state_like(state_dict: Mapping[str, Any],
                               optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict (as :func:`full_optimizer_state` returns) with each tensor of
    a sharded parameter's state cut to this rank's slice, placed like the parameter; ready for
    ``optimizer.load_state_dict``. No communication: every rank slices its own copy (every rank
    read the same checkpoint). Entries of plain parameters are unchanged.

    Raises:
        ValueError: ``state_dict`` is not an optimizer state dict, or a state tensor of a sharded
            parameter does not have the parameter's (global) shape (the state dict belongs to
            another model).
    """
    if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping)):
        raise ValueError("not an optimizer state dict (it has no 'state' mapping)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = [n for group in optimizer.param_groups
             for n in group.get("param_names", [None] * len(group["params"]))]
    state = {}
    for index, entry in state_dict["state"].items():
        p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        if not isinstance(p, DTensor):
            state[index] = entry
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"optimizer state of parameter {names[index] or index!r} is a "
                             f"{type(entry).__name__}, not a mapping")
        sliced = {}
        for key, v in entry.items():
            if isinstance(v, Tensor) and not isinstance(v, DTensor):
                if v.shape != p.shape:
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {names[index] or index!r} has "
                        f"shape {tuple(v.shape)}, the parameter's (global) shape is "
                        f"{tuple(p.shape)}")
                # src_data_rank=None: each rank keeps its slice of its own copy, nothing is sent.
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                      src_data_rank=None)
            sliced[key] = v
        state[index] = sliced
    return {**state_dict, "state": state}


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite, over all ranks' slices of sharded tensors
    (parameters, Ω): the same verdict on every rank, so a divergence stops all of them at once.
    Each rank checks its slices, then one all-reduce for all tensors (``torch.isfinite(p).all()``
    of a ``DTensor`` is reduced over the ranks too, but with one collective per tensor).
    Collective when any tensor is a ``DTensor``."""
    ok, sharded = True, False
    for t in tensors:
        sharded = sharded or isinstance(t, DTensor)
        local = t.to_local() if isinstance(t, DTensor) else t
        ok = ok and bool(torch.isfinite(local).all())
    if sharded:
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def even_batches(loader: Iterable[tuple[Tensor, Tensor]], sample_shape: tuple[int, ...],
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's ``(x, y)`` batches (``loader`` has a ``len()``: a DataLoader, a list), then batches of zero samples until it has yielded as many
    as the rank with the most.

    Every forward of a sharded model all-gathers parameters, a collective that hangs when the
    ranks run different numbers of forwards; ``fixed_shard`` deals out whole batches, so the
    counts differ by one when the ranks do not divide the number of batches. The empty batches
    (``x`` of shape ``(0, *sample_shape)``) run the forward and count nothing. Collective: one
    all-reduce of the batch counts (every rank calls it).
    """
    count = len(loader)  # type: ignore[arg-type]
    most = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    yield from loader  # type: ignore[misc]
    for _ in range(int(most.item()) - count):
        yield torch.zeros((0, *sample_shape)), torch.zeros((0,), dtype=torch.int64)


def _full_cpu(t: Tensor) -> Tensor:
    # copy=True also after full_tensor(): on one rank, or for a replicated DTensor, it can be
    # the live local tensor itself.
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().to("cpu", copy=True)
