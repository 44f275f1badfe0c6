"""One rank of tests/test_fsdp.py: MAS on a model sharded by FSDP2's ``fully_shard`` (gloo, CPU).

    python tests/fsdp_worker.py RANK WORLD PORT OUT_DIR

Runs every scenario in one process group (start-up is the slow part) and writes what the tests
check into OUT_DIR: full tensors gathered by rank 0, each rank's local slices, error messages.
The model, data and hyper-parameters are defined here and imported by the tests, so the
one-process references use exactly the same ones.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import mas_optim
from helpers import rank_main
from mas_optim.sharded import full_reg_params, is_sharded, shard_reg_params_like

STEPS, LOCAL_BATCH, REG_LAMBDA, LR, MOMENTUM = 4, 4, 0.5, 0.05, 0.9
OMEGA_KWARGS = {"per_sample": {}, "batch_formula": {"per_sample": False},
                "local": {"method": "local"}}
HOSTILE = ("hostile.pickle", "truncated.pickle", "wrong_shape.pickle", "empty.pickle")


class Scale(nn.Module):
    """y = x ⊙ w: a module no importance rule knows, so Ω takes the generic torch.func path,
    whose number of forwards depends on the number of samples."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def make_model() -> nn.Module:
    # Every parameter's first dimension is odd, so the two ranks' slices differ in size.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3))


def omega_batches(rank: int, world: int) -> list:
    """Rank 0: 16 samples in 4 batches; rank 1: 7 in 2 (uneven). world=1: all 6 batches."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(23, 1, 6, 6, generator=g)
    parts = [xs[:16], xs[16:]]
    chosen = parts if world == 1 else [parts[rank]]
    return [(part[i:i + 5],) for part in chosen for i in range(0, len(part), 5)]


def train_batches() -> list:
    """STEPS global batches of 2·LOCAL_BATCH samples; under 2 ranks rank r takes half r."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(2 * LOCAL_BATCH, 1, 6, 6, generator=g),
             torch.randint(0, 3, (2 * LOCAL_BATCH,), generator=g)) for _ in range(STEPS)]


def start_reg_params(model: nn.Module) -> dict:
    """Plain full reg_params with a nonzero Ω and θ* ≠ θ, so the penalty acts from step 1."""
    reg = mas_optim.init_reg_params(model)
    g = torch.Generator().manual_seed(3)
    for entry in reg.values():
        entry["omega"].uniform_(0, 1, generator=g)
        entry["init_val"].add_(0.1)
    return reg


def shard(model: nn.Module, world: int, hybrid: bool = False) -> nn.Module:
    """fully_shard over all ranks; hybrid: HSDP, replicated over the ranks (a 2-D mesh (world,
    1): placements (Replicate(), Shard(0)))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if hybrid:
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for i in (0, 4, 5, 7):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)   # the root holds BatchNorm's parameters
    return model


def placed_like(reg: dict, model: nn.Module) -> dict:
    """name -> True if both tensors are DTensors placed like the parameter, same local shape."""
    named = dict(model.named_parameters())
    return {name: all(is_sharded(t) and t.device_mesh == named[name].device_mesh
                      and t.placements == named[name].placements
                      and t.to_local().shape == named[name].to_local().shape
                      for t in entry.values())
            for name, entry in reg.items()}


def local_slices(reg: dict) -> dict:
    return {name: {k: t.to_local().clone() for k, t in entry.items()}
            for name, entry in reg.items()}


def make_optimizer(kind: str, model: nn.Module, reg: dict) -> torch.optim.Optimizer:
    if kind == "adamw":   # any optimizer, the penalty attached by add_mas_penalty
        opt = torch.optim.AdamW(model.named_parameters(), lr=LR, weight_decay=0.01)
        mas_optim.add_mas_penalty(opt, reg, reg_lambda=REG_LAMBDA)
        return opt
    # the penalty applied by its proximal map after the SGD step
    return mas_optim.LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=REG_LAMBDA,
                              lr=LR, momentum=MOMENTUM, proximal=True)


OPTIMIZERS = ("adamw", "proximal")


def train_with(kind: str, model: nn.Module, rank: int) -> dict:
    """A few steps with the optimizer ``kind``; returns the full weights. A sharded model's rank
    takes its half of each batch; an unsharded one (the one-process reference) whole batches."""
    model.eval()
    sharded = is_sharded(next(model.parameters()))
    reg = start_reg_params(make_model())
    if sharded:
        reg = shard_reg_params_like(reg, model)
    opt = make_optimizer(kind, model, reg)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if sharded else slice(None)
    for x, y in train_batches():
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
    return {n: p.full_tensor() if sharded else p.detach().clone()
            for n, p in model.named_parameters()}


def error_of(call) -> list | None:
    """[type name, message] of what call() raises (the test checks both), None if nothing."""
    try:
        call()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None


def run(rank: int, world: int, out: str) -> None:
    report: dict = {}
    model = shard(make_model(), world)
    model.eval()  # BatchNorm uses its running statistics: the step matches one process exactly

    def omega_of(label: str, model: nn.Module, batches: list, **kwargs) -> None:
        omega = mas_optim.compute_omega(model, batches, **kwargs)
        report[f"omega_{label}_placed"] = placed_like(
            {n: {"omega": o} for n, o in omega.items()}, model)
        full = {n: o.full_tensor() for n, o in omega.items()}
        if rank == 0:
            torch.save(full, os.path.join(out, f"omega_{label}.pt"))

    # Importance of the untrained model, data split unevenly over the ranks.
    for label, kwargs in OMEGA_KWARGS.items():
        omega_of(label, model, omega_batches(rank, world), **kwargs)
    # HSDP: Ω is all-reduced over the replicas.
    omega_of("hybrid", shard(make_model(), world, hybrid=True), omega_batches(rank, world))
    # A rank without data still takes part; the other rank's samples alone make Ω.
    omega_of("one_rank_empty", model, omega_batches(0, 1) if rank == 0 else [])

    fresh = mas_optim.init_reg_params(model)
    report["init_placed"] = placed_like(fresh, model)
    report["init_values"] = all(
        torch.equal(e["init_val"].to_local(), p.to_local()) and not e["omega"].to_local().any()
        for e, p in zip(fresh.values(), model.parameters()))

    # LocalSgd with the penalty on; each rank takes its half of every global batch.
    reg = shard_reg_params_like(start_reg_params(make_model()), model)
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=REG_LAMBDA,
                             lr=LR, momentum=MOMENTUM)
    half = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for x, y in train_batches():
        opt.zero_grad()
        F.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    report["penalty"] = float(opt.penalty())
    others = {kind: train_with(kind, shard(make_model(), world), rank) for kind in OPTIMIZERS}
    omega = mas_optim.compute_omega(model, omega_batches(rank, world))
    mas_optim.consolidate_reg_params(reg, model, omega)
    report["consolidated_placed"] = placed_like(reg, model)
    mas_optim.save_reg_params(reg, os.path.join(out, "two_ranks.pickle"))
    full_reg = full_reg_params(reg)
    if rank == 0:
        torch.save(weights, os.path.join(out, "weights.pt"))
        for kind, trained in others.items():
            torch.save(trained, os.path.join(out, f"{kind}.pt"))
        torch.save(full_reg, os.path.join(out, "full_reg.pt"))

    # Files in: one written by one process, the one just written, hostile ones.
    loaded = mas_optim.load_reg_params(os.path.join(out, "one_process.pickle"), model=model)
    report["loaded_placed"] = placed_like(loaded, model)
    torch.save(local_slices(loaded), os.path.join(out, f"loaded_{rank}.pt"))
    again = mas_optim.load_reg_params(os.path.join(out, "two_ranks.pickle"), model=model)
    report["reloaded_equal"] = all(
        torch.equal(again[n][k].to_local(), reg[n][k].to_local()) for n in reg for k in reg[n])
    for name in HOSTILE:
        report[name] = error_of(
            lambda: mas_optim.load_reg_params(os.path.join(out, name), model=model))

    # A write that fails on rank 0 is an error on every rank (not a hang in a barrier).
    blocked = os.path.join(out, "one_process.pickle", "reg_params.pickle")  # under a file
    report["failed_save_error"] = error_of(lambda: mas_optim.save_reg_params(reg, blocked))

    # Refused with a message: a full tensor of the wrong shape; a DTensor fully_shard does not
    # manage (its Ω would need collectives inside the pass).
    entry = start_reg_params(make_model())["4.weight"]
    wrong = {"4.weight": {k: t[:, :1] for k, t in entry.items()}}
    report["wrong_shape_error"] = error_of(lambda: shard_reg_params_like(wrong, model))
    from torch.distributed.tensor import distribute_tensor
    manual = make_model()
    manual[7].weight = nn.Parameter(distribute_tensor(manual[7].weight.detach(),
                                                      model[0].weight.device_mesh,
                                                      model[0].weight.placements))
    report["unmanaged_error"] = error_of(
        lambda: mas_optim.compute_omega(manual, omega_batches(rank, world)))

    with open(os.path.join(out, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    rank_main(run)
