"""Speed of the two hot paths, as ratios against baselines measured in the same run.

1. Training step: time(forward + backward + LocalSgd.step) / time(forward + backward +
   torch.optim.SGD.step), batch 128, momentum 0.9. For reference, the two usual ways of adding
   the penalty are timed too: through autograd in the loss (Avalanche, FACIL) and a Python loop
   over parameters that adds 2λΩ(θ−θ*) to .grad before SGD (the reimplementation's optimizer).
2. Importance pass: exact per-sample compute_omega against the batch formula
   (per_sample=False) and against the batch-size-1 loops that Eq. 2 otherwise needs: the
   cheapest one (autograd.grad per sample) and the original code's (backward + OmegaSgd.step).

CPU, one thread, medians of paired repeats (each repeat times baseline and candidate back to
back, in alternating order). Run:  python benchmarks/bench_mas.py   (about a minute)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
from torch import nn

import mas_optim


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def paired(fns: Dict[str, Callable[[], None]], repeats: int, inner: int) -> Dict[str, float]:
    """Median over repeats of each fn's time relative to the first one ('baseline')."""
    names = list(fns)
    ratios = {n: [] for n in names[1:]}
    base_times = []
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        t = {}
        for n in order:
            start = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            t[n] = (time.perf_counter() - start) / inner
        base_times.append(t[names[0]])
        for n in names[1:]:
            ratios[n].append(t[n] / t[names[0]])
    out = {n: statistics.median(v) for n, v in ratios.items()}
    out["baseline_ms"] = statistics.median(base_times) * 1e3
    return out


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


def bench_importance(model: nn.Module, xs: torch.Tensor, batch: int, repeats: int,
                     with_loop: bool = True) -> Dict[str, float]:
    loader = [(xs[i:i + batch],) for i in range(0, len(xs), batch)]
    params = [p for p in model.parameters() if p.requires_grad]

    def batch_size_one_loop():  # Eq. 2 with batch size 1, at its cheapest: autograd.grad
        model.eval()
        acc = [torch.zeros_like(p) for p in params]
        for i in range(len(xs)):
            grads = torch.autograd.grad(model(xs[i:i + 1]).pow(2).sum(), params)
            for a, g in zip(acc, grads):
                a.add_(g.abs())

    def omega_sgd_loop():  # Eq. 2 as the original code gets it: backward + optimizer step
        model.eval()
        opt = mas_optim.OmegaSgd(model.named_parameters())
        for i in range(len(xs)):
            opt.zero_grad()
            model(xs[i:i + 1]).pow(2).sum().backward()
            opt.step()

    fns = {
        "batch formula": lambda: mas_optim.compute_omega(model, loader, per_sample=False),
        "per-sample": lambda: mas_optim.compute_omega(model, loader),
    }
    if with_loop:
        fns["batch-size-1 loop"] = batch_size_one_loop
        fns["OmegaSgd loop"] = omega_sgd_loop
    for f in fns.values():
        f()
    return paired(fns, repeats, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, medians of {repeats} paired repeats\n")

    print("Training step, batch 128, momentum 0.9: time / time(torch.optim.SGD)")
    for hidden, inner in ((400, 20), (2000, 3)):
        model = mlp(hidden)
        n = sum(p.numel() for p in model.parameters())
        r = bench_step(hidden, repeats, inner)
        print(f"  MLP 784-{hidden}-{hidden}-10 ({n / 1e6:.2f}M params), SGD "
              f"{r['baseline_ms']:.2f} ms per step:  LocalSgd {r['LocalSgd']:.3f}x   "
              f"autograd penalty {r['autograd penalty']:.3f}x   "
              f"python loop {r['python loop']:.3f}x")

    print("\nImportance pass (compute_omega), 512 samples, batch 128: time / time(batch formula)")
    torch.manual_seed(0)
    cases = (("MLP 784-400-400-10", mlp(400), torch.randn(512, 784)),
             ("small CNN (2 conv + 2 fc, 28x28)", small_cnn(), torch.randn(512, 1, 28, 28)))
    for label, model, xs in cases:
        r = bench_importance(model, xs, 128, max(3, repeats // 3))
        loop, original = r["batch-size-1 loop"], r["OmegaSgd loop"]
        print(f"  {label}: batch formula {r['baseline_ms']:.1f} ms; per-sample "
              f"{r['per-sample']:.2f}x; batch-size-1 loops: autograd.grad {loop:.2f}x, "
              f"OmegaSgd {original:.2f}x (per-sample is {loop / r['per-sample']:.1f}x and "
              f"{original / r['per-sample']:.1f}x faster)")


if __name__ == "__main__":
    main()
