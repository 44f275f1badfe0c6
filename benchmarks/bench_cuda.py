"""Speed of the training step (forward + backward + step) on a CUDA GPU, as ratios against
torch's fused optimizers measured in the same run: ResNet-18 at 224² (batch 64) and 32²
(batch 128).

SGD side: each candidate against ``torch.optim.SGD(momentum=0.9, fused=True)``: torch's default
(foreach) SGD, LocalSgd's default (foreach on CUDA) and its single-tensor step. AdamW side:
``AdamW(fused=True)`` + add_mas_penalty (foreach) against ``AdamW(fused=True)``. Each candidate
is paired with its baseline alone, alternating, medians of paired repeats; the clock
synchronises the GPU. Needs torchvision. Run:  python benchmarks/bench_cuda.py
(``--device cpu`` runs it small on the CPU, as a check of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import torch
from torch import nn

import mas_optim

try:
    from benchmarks._timing import each_against_baseline
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import each_against_baseline

SIZES = {"cuda": ((224, 64), (32, 128)), "cpu": ((32, 8),)}  # (side, batch)
LAM = 0.01


def clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def resnet18(device: torch.device) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).to(device)


def reg_params_for(model: nn.Module) -> dict:
    return {n: {"omega": torch.rand_like(p), "init_val": p.detach() + 0.01 * torch.randn_like(p)}
            for n, p in model.named_parameters()}


def training_steps(device: torch.device, side: int, batch: int, repeats: int,
                   inner: int) -> Dict[str, Dict[str, float]]:
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def runner(make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[[], None]:
        model = resnet18(device)
        opt = make_opt(model)

        def run():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    def penalised_adamw(model):
        opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3, fused=True)
        mas_optim.add_mas_penalty(opt, reg_params_for(model), reg_lambda=LAM)
        return opt

    def local(**options):
        return lambda m: mas_optim.LocalSgd(m.named_parameters(), reg_params=reg_params_for(m),
                                            reg_lambda=LAM, lr=1e-3, momentum=0.9, **options)

    sgd = {"baseline": runner(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9,
                                                        fused=True)),
           "SGD default": runner(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3,
                                                           momentum=0.9)),
           "LocalSgd default": runner(local()),
           "LocalSgd single_tensor": runner(local(foreach=False))}
    adamw = {"baseline": runner(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3,
                                                            fused=True)),
             "add_mas_penalty": runner(penalised_adamw)}
    out = {}
    for name, fns in (("SGD(momentum=0.9, fused=True)", sgd), ("AdamW(fused=True)", adamw)):
        for f in fns.values():  # warm up: state, allocator, cuDNN
            f()
            f()
        out[name] = each_against_baseline(fns, repeats, inner, clock)
    return out


def main(device: torch.device, repeats: int) -> None:
    print(f"torch {torch.__version__} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f", medians of {repeats} paired repeats")
    for side, batch in SIZES[device.type]:
        for base, r in training_steps(device, side, batch, repeats, 5).items():
            print(f"ResNet-18 {side}x{side}, batch {batch}: time / time({base}) = "
                  f"{r.pop('baseline_ms'):.2f} ms")
            for name, ratio in r.items():
                print(f"    {name:24s} {ratio:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    main(device, args.repeats)
