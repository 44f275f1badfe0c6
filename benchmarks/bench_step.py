"""Speed of the optimizer step, as ratios against torch.optim.SGD measured in the same run.

time(forward + backward + LocalSgd.step) / time(forward + backward + torch.optim.SGD.step),
batch 128, momentum 0.9. For reference, the two usual ways of adding the penalty are timed too:
through autograd in the loss (Avalanche, FACIL) and a Python loop over parameters that adds
2λΩ(θ−θ*) to .grad before SGD (the reimplementation's optimizer).

CPU, one thread, medians of paired repeats (each repeat times baseline and candidate back to
back, in alternating order). Run:  python benchmarks/bench_step.py
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
from torch import nn

import mas_optim

try:
    from benchmarks._timing import paired
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import paired


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def reg_params_for(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: {"omega": torch.rand(p.shape, generator=g),
                "init_val": p.detach() + 0.01 * torch.randn(p.shape, generator=g)}
            for n, p in model.named_parameters()}


def bench_step(hidden: int, repeats: int, inner: int) -> Dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    lam, hp = 0.01, dict(lr=1e-3, momentum=0.9)

    def runner(model, opt, extra_loss=None, before_step=None):
        def run():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
        return run

    m_sgd = mlp(hidden)
    m_local = mlp(hidden)
    m_auto = mlp(hidden)
    m_loop = mlp(hidden)
    reg = reg_params_for(m_local)
    named_auto = list(m_auto.named_parameters())
    named_loop = list(m_loop.named_parameters())

    def autograd_penalty():  # Avalanche / FACIL style
        return lam * sum((reg[n]["omega"] * (p - reg[n]["init_val"]).pow(2)).sum()
                         for n, p in named_auto)

    @torch.no_grad()
    def python_loop():  # the reimplementation's style: grad += 2λΩ(θ − θ*) per parameter
        for n, p in named_loop:
            p.grad.add_(2 * lam * reg[n]["omega"] * (p - reg[n]["init_val"]))

    fns = {
        "baseline": runner(m_sgd, torch.optim.SGD(m_sgd.parameters(), **hp)),
        "LocalSgd": runner(m_local, mas_optim.LocalSgd(m_local.named_parameters(),
                                                        reg_params=reg, reg_lambda=lam, **hp)),
        "autograd penalty": runner(m_auto, torch.optim.SGD(m_auto.parameters(), **hp),
                                   extra_loss=autograd_penalty),
        "python loop": runner(m_loop, torch.optim.SGD(m_loop.parameters(), **hp),
                              before_step=python_loop),
    }
    for f in fns.values():  # warm up: momentum buffers, allocator
        f()
        f()
    return paired(fns, repeats, inner)


def main(repeats: int) -> None:
    print("Training step, batch 128, momentum 0.9: time / time(torch.optim.SGD)")
    for hidden, inner in ((400, 20), (2000, 3)):
        model = mlp(hidden)
        n = sum(p.numel() for p in model.parameters())
        r = bench_step(hidden, repeats, inner)
        print(f"  MLP 784-{hidden}-{hidden}-10 ({n / 1e6:.2f}M params), SGD "
              f"{r['baseline_ms']:.2f} ms per step:  LocalSgd {r['LocalSgd']:.3f}x   "
              f"autograd penalty {r['autograd penalty']:.3f}x   "
              f"python loop {r['python loop']:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(3 if args.quick else args.repeats)
