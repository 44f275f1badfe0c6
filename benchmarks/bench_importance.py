"""Speed of the importance pass, as ratios against baselines measured in the same run.

Exact per-sample compute_omega against the batch formula (per_sample=False) and against the
batch-size-1 loops that Eq. 2 otherwise needs: the cheapest one (autograd.grad per sample) and
the original code's (backward + OmegaSgd.step).

CPU, one thread, medians of paired repeats. Run:  python benchmarks/bench_importance.py
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


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


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


def main(repeats: int) -> None:
    print("Importance pass (compute_omega), 512 samples, batch 128: time / time(batch formula)")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(3 if args.quick else args.repeats)
