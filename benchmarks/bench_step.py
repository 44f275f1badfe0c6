"""Speed of the optimizer step, as ratios against the plain optimizer measured in the same run.

time(forward + backward + LocalSgd.step) / time(forward + backward + torch.optim.SGD.step),
batch 128, momentum 0.9, on two MLPs, for LocalSgd's default step (on the CPU the one-pass C
kernel of mas_optim/csrc, built at first use) and its eager steps (``fused=False``: torch ops,
with and without the two cached tensors). For reference, the two usual ways of adding the penalty
are timed too: through autograd in the loss (Avalanche, FACIL) and a Python loop over
parameters that adds 2λΩ(θ−θ*) to .grad before SGD. Then the same for AdamW: the penalty
attached by mas_optim.add_mas_penalty against plain torch.optim.AdamW. Last, optimizer.step()
alone on a model of 204 small tensors, where the per-tensor work of the step is what costs.

CPU, one thread (``--threads N`` for more), medians of paired repeats: each candidate is paired
with the baseline alone, each repeat timing the two back to back in alternating order. Run:  python benchmarks/bench_step.py
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict

import torch
from torch import nn

import mas_optim
from mas_optim import _kernels

try:
    from benchmarks._timing import each_against_baseline
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import each_against_baseline


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def deep_mlp(depth: int = 100, width: int = 32) -> nn.Module:
    """Many small parameter tensors (2·depth + 4): the step's per-tensor work dominates, as in
    ResNets and transformers with their hundreds of small tensors."""
    layers = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


MODELS = [  # (label, constructor, inner repeats)
    ("MLP 784-400-400-10", lambda: mlp(400), 20),
    ("MLP 784-2000-2000-10", lambda: mlp(2000), 6),
]


def reg_params_for(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: {"omega": torch.rand(p.shape, generator=g),
                "init_val": p.detach() + 0.01 * torch.randn(p.shape, generator=g)}
            for n, p in model.named_parameters()}


def bench_step(make_model: Callable[[], nn.Module], repeats: int,
               inner: int) -> Dict[str, Any]:
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

    models = {name: make_model() for name in ("sgd", "local", "eager", "lean", "auto", "loop")}
    reg = reg_params_for(models["local"])
    named_auto = list(models["auto"].named_parameters())
    named_loop = list(models["loop"].named_parameters())

    def autograd_penalty(named):  # Avalanche / FACIL style
        return lambda: lam * sum((reg[n]["omega"] * (p - reg[n]["init_val"]).pow(2)).sum()
                                 for n, p in named)

    @torch.no_grad()
    def python_loop():  # grad += 2λΩ(θ − θ*), one parameter at a time
        for n, p in named_loop:
            p.grad.add_(2 * lam * reg[n]["omega"] * (p - reg[n]["init_val"]))

    def local_sgd(model, **options):
        return mas_optim.LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=lam,
                                  **hp, **options)

    sgd_fns = {
        "baseline": runner(models["sgd"], torch.optim.SGD(models["sgd"].parameters(), **hp)),
        "LocalSgd": runner(models["local"], local_sgd(models["local"])),
        "LocalSgd eager": runner(models["eager"], local_sgd(models["eager"], fused=False)),
        "LocalSgd eager uncached": runner(models["lean"], local_sgd(
            models["lean"], fused=False, cache_penalty=False)),
        "autograd penalty": runner(models["auto"], torch.optim.SGD(models["auto"].parameters(),
                                                                   **hp),
                                   extra_loss=autograd_penalty(named_auto)),
        "python loop": runner(models["loop"], torch.optim.SGD(models["loop"].parameters(), **hp),
                              before_step=python_loop),
    }
    adam_hp = dict(lr=1e-3, weight_decay=0.01)
    adam = {name: make_model() for name in ("plain", "hook", "eager", "cached", "auto")}
    adam_opts = {name: torch.optim.AdamW(m.named_parameters(), **adam_hp)
                 for name, m in adam.items()}
    mas_optim.add_mas_penalty(adam_opts["hook"], reg, reg_lambda=lam)
    mas_optim.add_mas_penalty(adam_opts["eager"], reg, reg_lambda=lam, fused=False)
    mas_optim.add_mas_penalty(adam_opts["cached"], reg, reg_lambda=lam, fused=False,
                              cache_penalty=True)
    adam_fns = {
        "baseline": runner(adam["plain"], adam_opts["plain"]),
        "add_mas_penalty": runner(adam["hook"], adam_opts["hook"]),
        "add_mas_penalty eager": runner(adam["eager"], adam_opts["eager"]),
        "add_mas_penalty eager cached": runner(adam["cached"], adam_opts["cached"]),
        "autograd penalty": runner(adam["auto"], adam_opts["auto"],
                                   extra_loss=autograd_penalty(list(adam["auto"].named_parameters()))),
    }
    for f in (*sgd_fns.values(), *adam_fns.values()):  # warm up: buffers, allocator, compile
        f()
        f()
    return {"sgd": each_against_baseline(sgd_fns, repeats, inner),
            "adamw": each_against_baseline(adam_fns, repeats, inner)}


def bench_step_alone(repeats: int, inner: int = 50) -> Dict[str, Dict[str, float]]:
    """optimizer.step() alone (the same gradients every time) on deep_mlp's 204 small tensors,
    where the per-tensor work of the step is what costs; its forward and backward are too noisy
    here to time the whole training step."""
    torch.manual_seed(0)
    lam, hp = 0.01, dict(lr=1e-3, momentum=0.9)
    models = {name: deep_mlp() for name in ("sgd", "local", "head", "eager", "adamw", "hook")}
    for m in models.values():
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    reg = reg_params_for(models["local"])
    adamw, hooked = (torch.optim.AdamW(models[k].named_parameters(), lr=1e-3)
                     for k in ("adamw", "hook"))
    mas_optim.add_mas_penalty(hooked, reg, reg_lambda=lam)
    sgd_fns = {
        "baseline": torch.optim.SGD(models["sgd"].parameters(), **hp).step,
        "LocalSgd": mas_optim.LocalSgd(models["local"].named_parameters(), reg_params=reg,
                                       reg_lambda=lam, **hp).step,
        "LocalSgd eager": mas_optim.LocalSgd(models["eager"].named_parameters(), reg_params=reg,
                                             reg_lambda=lam, fused=False, **hp).step,
        # the last layer without an entry, as a new task's head: stepped by torch's SGD
        "LocalSgd head": mas_optim.LocalSgd(models["head"].named_parameters(),
                                            reg_params=dict(list(reg.items())[:-2]),
                                            reg_lambda=lam, **hp).step,
    }
    adam_fns = {"baseline": adamw.step, "add_mas_penalty": hooked.step}
    for f in (*sgd_fns.values(), *adam_fns.values()):  # state, kernel plans
        f()
        f()
        f()
    return {"sgd": each_against_baseline(sgd_fns, repeats, inner),
            "adamw": each_against_baseline(adam_fns, repeats, inner)}


def main(repeats: int) -> None:
    print("Training step, batch 128: time / time(plain optimizer), medians of paired repeats")
    for label, make_model, inner in MODELS:
        params = list(make_model().parameters())
        n = sum(p.numel() for p in params)
        r = bench_step(make_model, repeats, inner)
        s, a = r["sgd"], r["adamw"]
        kernel = "" if _kernels.load() is not None else f" (eager: {_kernels.reason()})"
        print(f"  {label} ({n / 1e6:.2f}M params in {len(params)} tensors)")
        print(f"    SGD momentum 0.9, {s['baseline_ms']:.2f} ms per step:  "
              f"LocalSgd {s['LocalSgd']:.3f}x{kernel}   eager {s['LocalSgd eager']:.3f}x   "
              f"eager uncached {s['LocalSgd eager uncached']:.3f}x   "
              f"autograd penalty {s['autograd penalty']:.3f}x   "
              f"python loop {s['python loop']:.3f}x")
        print(f"    AdamW, {a['baseline_ms']:.2f} ms per step:  "
              f"add_mas_penalty {a['add_mas_penalty']:.3f}x{kernel}   "
              f"eager {a['add_mas_penalty eager']:.3f}x   "
              f"eager cached {a['add_mas_penalty eager cached']:.3f}x   "
              f"autograd penalty {a['autograd penalty']:.3f}x")
    r = bench_step_alone(repeats)
    s, a = r["sgd"], r["adamw"]
    print("Optimizer step alone, MLP 784-32, 100 x 32-32, 32-10 (0.13M params in 204 tensors)")
    print(f"    SGD momentum 0.9, {s['baseline_ms']:.2f} ms per step:  "
          f"LocalSgd {s['LocalSgd']:.3f}x   eager {s['LocalSgd eager']:.3f}x   "
          f"LocalSgd, head without entry {s['LocalSgd head']:.3f}x")
    print(f"    AdamW, {a['baseline_ms']:.2f} ms per step:  "
          f"add_mas_penalty {a['add_mas_penalty']:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(3 if args.quick else args.repeats)
