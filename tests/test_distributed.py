"""mas_optim under torch.distributed: 2 gloo processes on loopback."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mas_optim

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3))


def all_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(23, 1, 6, 6, generator=g)


def worker(rank, world, port, out_dir, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        job(rank, out_dir)
        # both ranks are past their last collective before either tears the group down (a
        # rank that closes its connections while the other still uses them can abort it)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_batches(rank):
    xs = all_data()
    shard = xs[:16] if rank == 0 else xs[16:]  # uneven: 16 and 7 samples
    return [(shard[i:i + 5],) for i in range(0, len(shard), 5)]


def omega_job(rank, out_dir):
    model = make_model()
    for per_sample in (True, False):
        batches = shard_batches(rank)
        omega = mas_optim.compute_omega(model, batches, per_sample=per_sample)
        torch.save(omega, os.path.join(out_dir, f"omega_{per_sample}_{rank}.pt"))


DDP_LAMBDA, DDP_HP, DDP_STEPS = 0.5, dict(lr=0.05, momentum=0.9), 4


def ddp_reg_params(model):
    reg = mas_optim.init_reg_params(model)
    g = torch.Generator().manual_seed(3)
    for entry in reg.values():
        entry["omega"].uniform_(0, 1, generator=g)
        entry["init_val"].add_(0.1)
    return reg


def rank_batches(rank):
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    return [(torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(DDP_STEPS)]


def ddp_job(rank, out_dir):
    model = make_model()
    ddp = DDP(model)
    # DDP names parameters "module.*": key reg_params by the names the optimizer sees.
    opt = mas_optim.LocalSgd(ddp.named_parameters(),
                             reg_params={"module." + n: e
                                         for n, e in ddp_reg_params(model).items()},
                             reg_lambda=DDP_LAMBDA, **DDP_HP)
    for x, y in rank_batches(rank):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), os.path.join(out_dir, f"ddp_{rank}.pt"))


def one_process(reg_lambda):
    """What DDP computes, in one process: the mean of the two ranks' losses (each rank's half
    through the model on its own, so BatchNorm uses per-half statistics, as on each rank)."""
    model = make_model()
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_params=ddp_reg_params(model),
                             reg_lambda=reg_lambda, **DDP_HP)
    for (x0, y0), (x1, y1) in zip(rank_batches(0), rank_batches(1)):
        opt.zero_grad()
        loss = (nn.functional.cross_entropy(model(x0), y0)
                + nn.functional.cross_entropy(model(x1), y1)) / 2
        loss.backward()
        opt.step()
    return dict(model.named_parameters())


def spawn(job, out_dir):
    out_dir = str(out_dir)
    # join=True raises if a worker fails and terminates the others; the gloo timeout bounds hangs.
    mp.spawn(worker, args=(2, free_port(), out_dir, job), nprocs=2, join=True)
    return out_dir


def test_compute_omega_over_two_ranks_equals_one_process_on_all_data(tmp_path):
    out = spawn(omega_job, tmp_path)
    model = make_model()
    for per_sample in (True, False):
        # one process: the same batches as the two shards together
        batches = shard_batches(0) + shard_batches(1)
        want = mas_optim.compute_omega(model, batches, per_sample=per_sample)
        got = [torch.load(os.path.join(out, f"omega_{per_sample}_{r}.pt")) for r in (0, 1)]
        for n in want:
            assert torch.equal(got[0][n], got[1][n]), n  # every rank ends with the same Ω
            err = ((got[0][n] - want[n]).abs().max() / want[n].abs().max()).item()
            assert err <= 1e-5, (per_sample, n, err)


def test_local_sgd_inside_ddp_equals_one_process_with_the_penalty(tmp_path):
    out = spawn(ddp_job, tmp_path)
    a, b = (torch.load(os.path.join(out, f"ddp_{r}.pt")) for r in (0, 1))
    want, unpenalised = one_process(DDP_LAMBDA), one_process(0.0)
    for k, p in want.items():  # parameters only: BatchNorm's running statistics differ
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], p.detach(), rtol=1e-5, atol=1e-6, msg=k)
    # guards the comparison: without the penalty the result is measurably different
    assert max((want[k] - unpenalised[k]).abs().max().item() for k in want) > 1e-3
