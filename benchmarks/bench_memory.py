"""Per-rank memory of MAS training under FSDP2 (fully_shard) against DDP, 2 gloo processes.

Each rank trains an MLP with LocalSgd (momentum 0.9, the penalty on) for a few steps, computes Ω
and consolidates it, then counts the bytes of the tensors it holds, by what they are for:
parameters, their gradients, the optimizer's state (momentum buffers), reg_params (Ω and θ*) and
any other tensor the optimizer keeps (LocalSgd's cached 2λΩ and 2λΩθ*). A tensor's bytes are
those of its storage, counted once per storage, on this rank only (a DTensor's local shard, with
FSDP's padding). DDP's gradient buckets and communication buffers are not counted (they would
only add to DDP's side), nor are activations.

    python benchmarks/bench_memory.py           # MLP 784-2000-2000-10 (5.6M parameters)
    python benchmarks/bench_memory.py --quick   # MLP 784-400-400-10 (0.48M parameters)
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
from typing import Dict, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mas_optim
from mas_optim.sharded import is_sharded

WORLD = 2
COLUMNS = ("parameters", "gradients", "optimizer state", "reg_params", "optimizer cache")
# The goal counts these (gradients are shown, and sharded, too).
WITHOUT_GRADIENTS = ("parameters", "optimizer state", "reg_params", "optimizer cache")


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def _tensors(obj, seen_objects: set) -> Iterable[torch.Tensor]:
    """Every tensor reachable from obj through dicts, lists, tuples, sets and object attributes
    (__dict__ and __slots__)."""
    if id(obj) in seen_objects:
        return
    seen_objects.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield _local(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(key, seen_objects)
            yield from _tensors(value, seen_objects)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors(value, seen_objects)
    elif not isinstance(obj, (type, nn.Module)):
        for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
            yield from _tensors(value, seen_objects)
        for cls in type(obj).__mro__:   # objects with __slots__ (LocalSgd's cached terms)
            slots = getattr(cls, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if hasattr(obj, slot):
                    yield from _tensors(getattr(obj, slot), seen_objects)


class StorageCounter:
    """Bytes of distinct storages; a storage is counted in the first category that reaches it."""

    def __init__(self) -> None:
        self.seen: set = set()

    def count(self, tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def measure(rank: int, mode: str, hidden: int, steps: int) -> Dict[str, int]:
    model = mlp(hidden)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        plain = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
        plain = wrapped.module
    prefix = "" if mode == "fsdp" else "module."

    reg = mas_optim.init_reg_params(wrapped)
    opt = mas_optim.LocalSgd(wrapped.named_parameters(), reg_params=reg, reg_lambda=1.0,
                             lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(10 + rank)   # each rank its own data
    data = [(torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(steps)]
    for _ in range(2):  # task 1, then task 2 with the penalty on (Ω > 0)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(wrapped(x), y).backward()
            opt.step()
        # DDP: Ω of the plain module (see README, Distributed); FSDP: of the sharded model.
        omega = mas_optim.compute_omega(plain, [(x,) for x, _ in data])
        mas_optim.consolidate_reg_params(reg, wrapped, {prefix + n: o for n, o in omega.items()})

    params = [p for _, p in wrapped.named_parameters()]
    counter = StorageCounter()
    sizes = {
        "parameters": counter.count(_local(p) for p in params),
        "gradients": counter.count(_local(p.grad) for p in params if p.grad is not None),
        "optimizer state": counter.count(_tensors(opt.state, set())),
        "reg_params": counter.count(_tensors(reg, set())),
    }
    # Whatever else the optimizer holds (LocalSgd's cached penalty tensors); parameters,
    # state and reg_params were counted above and are skipped by the counter.
    sizes["optimizer cache"] = counter.count(_tensors(opt, set()))
    return sizes


def worker(rank: int, port: int, hidden: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        results = {mode: measure(rank, mode, hidden, steps) for mode in ("ddp", "fsdp")}
        every = [None] * WORLD
        dist.all_gather_object(every, results)
        if rank == 0:
            report(every, hidden)
    finally:
        dist.destroy_process_group()


def report(every: list, hidden: int) -> None:
    n_params = sum(p.numel() for p in mlp(hidden).parameters())
    print(f"torch {torch.__version__}, MLP 784-{hidden}-{hidden}-10 ({n_params / 1e6:.2f}M "
          f"parameters, float32), LocalSgd momentum 0.9, {WORLD} gloo processes")
    print("per-rank MiB of the tensors each rank holds after two tasks (Ω consolidated)\n")
    header = ["", *COLUMNS, "total", "total w/o gradients"]
    rows = [[f"{mode.upper()} rank {rank}", *(sizes[c] for c in COLUMNS), sum(sizes.values()),
             sum(sizes[c] for c in WITHOUT_GRADIENTS)]
            for mode in ("ddp", "fsdp") for rank, sizes in enumerate(r[mode] for r in every)]
    widths = [max(len(r[0]) for r in rows)] + [max(len(h), 8) for h in header[1:]]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print(" | ".join([row[0].ljust(widths[0])]
                         + [f"{v / 2**20:.2f}".rjust(w) for v, w in zip(row[1:], widths[1:])]))

    def largest(mode: str, columns) -> int:
        return max(sum(r[mode][c] for c in columns) for r in every)

    ratio = largest("fsdp", WITHOUT_GRADIENTS) / largest("ddp", WITHOUT_GRADIENTS)
    print(f"\nlargest rank, FSDP / DDP: without gradients {ratio:.3f}x "
          f"(goal <= 0.55: {'met' if ratio <= 0.55 else 'NOT met'}), "
          f"total {largest('fsdp', COLUMNS) / largest('ddp', COLUMNS):.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 0.48M-parameter MLP")
    args = parser.parse_args()
    hidden = 400 if args.quick else 2000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, hidden, 3), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
