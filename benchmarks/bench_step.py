"""Speed of the training step (forward + backward + step), as ratios against torch's fused
optimizers measured in the same run.

Two MLPs (784-400-400-10 and 784-2000-2000-10), batch 128, one thread. SGD side: each candidate
against ``torch.optim.SGD(momentum=0.9, fused=True)``: torch's default SGD, LocalSgd with each
implementation of mas_optim.functional (the default, ``foreach=True``, ``fused=False``; the
last also with its cache-sized slices switched off), the torch-native alternative to the C
kernel (a foreach penalty added to .grad, then ``SGD(fused=True)``), and the penalty through
autograd. AdamW side: each against ``torch.optim.AdamW(fused=True)``: torch's default AdamW and
``AdamW(fused=True)`` + add_mas_penalty with each implementation, and through autograd.

Medians of paired repeats: each candidate is paired with the baseline alone, the two timed
back to back in alternating order. The clock is this process's CPU time
(``time.process_time``), which other work on a shared machine inflates less than wall time
(``--wall`` for wall time). Run:  python benchmarks/bench_step.py  [--repeats N] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, Dict

import torch
from torch import nn

import mas_optim
from mas_optim import functional

try:
    from benchmarks._timing import each_against_baseline
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import each_against_baseline

MODELS = [  # (label, hidden width, inner repeats)
    ("MLP 784-400-400-10", 400, 20),
    ("MLP 784-2000-2000-10", 2000, 6),
]
LAM = 0.01
SGD_HP = dict(lr=1e-3, momentum=0.9)
ADAMW_HP = dict(lr=1e-3, weight_decay=0.01)


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def reg_params_for(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: {"omega": torch.rand(p.shape, generator=g),
                "init_val": p.detach() + 0.01 * torch.randn(p.shape, generator=g)}
            for n, p in model.named_parameters()}


@contextlib.contextmanager
def unsliced():
    """The single-tensor step without its cache-sized slices."""
    before = functional._SLICE_ABOVE
    functional._SLICE_ABOVE = 1 << 62
    try:
        yield
    finally:
        functional._SLICE_ABOVE = before


def training_step(model: nn.Module, opt, x, y, *, extra_loss=None, before_step=None,
                  context=contextlib.nullcontext) -> Callable[[], None]:
    def run():
        with context():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
    return run


def autograd_penalty(model: nn.Module, reg: dict) -> Callable[[], torch.Tensor]:
    named = list(model.named_parameters())
    return lambda: LAM * sum((reg[n]["omega"] * (p - reg[n]["init_val"]).square()).sum()
                             for n, p in named)


def foreach_penalty(model: nn.Module, reg: dict) -> Callable[[], None]:
    """g += 2λΩ(θ − θ*) with torch's foreach ops, written by hand (no mas_optim)."""
    ps = list(model.parameters())
    omegas = [reg[n]["omega"] for n, _ in model.named_parameters()]
    inits = [reg[n]["init_val"] for n, _ in model.named_parameters()]

    @torch.no_grad()
    def add():
        torch._foreach_addcmul_([p.grad for p in ps], omegas, torch._foreach_sub(ps, inits),
                                value=2 * LAM)
    return add


def sgd_candidates(hidden: int, x, y) -> Dict[str, Callable[[], None]]:
    fns: Dict[str, Callable[[], None]] = {}
    m = mlp(hidden)
    fns["baseline"] = training_step(m, torch.optim.SGD(m.parameters(), fused=True, **SGD_HP), x, y)
    m = mlp(hidden)
    fns["SGD default"] = training_step(m, torch.optim.SGD(m.parameters(), **SGD_HP), x, y)
    for label, options, context in (
            ("LocalSgd default", {}, contextlib.nullcontext),
            ("LocalSgd foreach", dict(foreach=True), contextlib.nullcontext),
            ("LocalSgd single_tensor", dict(fused=False), contextlib.nullcontext),
            ("LocalSgd single_tensor unsliced", dict(fused=False), unsliced)):
        m = mlp(hidden)
        opt = mas_optim.LocalSgd(m.named_parameters(), reg_params=reg_params_for(m),
                                 reg_lambda=LAM, **SGD_HP, **options)
        fns[label] = training_step(m, opt, x, y, context=context)
    m = mlp(hidden)
    fns["foreach penalty + SGD fused"] = training_step(
        m, torch.optim.SGD(m.parameters(), fused=True, **SGD_HP), x, y,
        before_step=foreach_penalty(m, reg_params_for(m)))
    m = mlp(hidden)
    fns["autograd penalty + SGD fused"] = training_step(
        m, torch.optim.SGD(m.parameters(), fused=True, **SGD_HP), x, y,
        extra_loss=autograd_penalty(m, reg_params_for(m)))
    return fns


def adamw_candidates(hidden: int, x, y) -> Dict[str, Callable[[], None]]:
    fns: Dict[str, Callable[[], None]] = {}
    m = mlp(hidden)
    fns["baseline"] = training_step(
        m, torch.optim.AdamW(m.parameters(), fused=True, **ADAMW_HP), x, y)
    m = mlp(hidden)
    fns["AdamW default"] = training_step(m, torch.optim.AdamW(m.parameters(), **ADAMW_HP), x, y)
    for label, options in (("add_mas_penalty default", {}),
                           ("add_mas_penalty foreach", dict(foreach=True)),
                           ("add_mas_penalty single_tensor", dict(fused=False))):
        m = mlp(hidden)
        opt = torch.optim.AdamW(m.named_parameters(), fused=True, **ADAMW_HP)
        mas_optim.add_mas_penalty(opt, reg_params_for(m), reg_lambda=LAM, **options)
        fns[label] = training_step(m, opt, x, y)
    m = mlp(hidden)
    fns["autograd penalty"] = training_step(
        m, torch.optim.AdamW(m.parameters(), fused=True, **ADAMW_HP), x, y,
        extra_loss=autograd_penalty(m, reg_params_for(m)))
    return fns


def main(repeats: int, clock: Callable[[], float]) -> None:
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    impl, why = functional.implementation([torch.zeros(1)])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 128, "
          f"medians of {repeats} paired repeats; CPU default implementation: {impl} ({why})")
    for label, hidden, inner in MODELS:
        for name, make, base in (("SGD", sgd_candidates, "SGD(momentum=0.9, fused=True)"),
                                 ("AdamW", adamw_candidates, "AdamW(fused=True)")):
            fns = make(hidden, x, y)
            for f in fns.values():  # warm up: state, allocator, the kernel's build
                f()
                f()
            r = each_against_baseline(fns, repeats, inner, clock)
            print(f"{label}, {name}: time / time({base}) = {r.pop('baseline_ms'):.2f} ms")
            for candidate, ratio in r.items():
                print(f"    {candidate:34s} {ratio:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(3 if args.quick else args.repeats, time.perf_counter if args.wall else time.process_time)
