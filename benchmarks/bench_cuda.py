"""Speed of the optimizer step on a CUDA GPU, as ratios against torch's own optimizer measured in
the same run: ResNet-18 training steps (forward + backward + step) at two input sizes, and the
optimizer step alone.

SGD (momentum 0.9) with ``foreach=True``, torch's multi-tensor path and its default on CUDA, is
the baseline for LocalSgd's default (the same multi-tensor path with the penalty) and its other
paths; torch's ``fused=True`` SGD is timed as a peer. AdamW (``foreach=True``, and
``fused=True``) is the baseline for the same AdamW with ``add_mas_penalty``. Each candidate is
paired with its baseline alone, alternating, medians of paired repeats; the clock synchronises
the GPU. ``--variants`` also times four ways of writing and compiling LocalSgd's compiled step
(how the shipped one was chosen). Needs torchvision. Run:  python benchmarks/bench_cuda.py
(``--device cpu`` runs it small on the CPU, as a check of the script, not a measurement).

``--host`` measures, on the CPU, what the host spends per optimizer step with torch's
multi-tensor kernels replaced by no-ops: the part of a GPU step that no GPU makes faster, and
all a launch-bound step waits for.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import types
from typing import Callable, Dict, Optional

import torch
from torch import nn

import mas_optim
from mas_optim import local_sgd

try:
    from benchmarks._timing import each_against_baseline
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import each_against_baseline


SIZES = {"cuda": ((224, 64), (32, 128)), "cpu": ((32, 8),)}  # (side, batch)


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


def against(baseline: Callable[[], None], candidates: Dict[str, Callable[[], None]],
            repeats: int, inner: int) -> Dict[str, float]:
    for f in (baseline, *candidates.values()):  # warm up: state, allocator, cuDNN, compile
        for _ in range(3):
            f()
    return each_against_baseline({"baseline": baseline, **candidates}, repeats, inner, clock)


def resnet18_with_grads(device: torch.device) -> nn.Module:
    """For the step alone: the same gradients at every step."""
    model = resnet18(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def training_steps(device: torch.device, side: int, batch: int, repeats: int, inner: int,
                   compiled: bool) -> Dict[str, Dict[str, float]]:
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    lam, hp = 0.01, dict(lr=1e-3, momentum=0.9)

    def runner(opt_factory, penalty: Optional[dict] = None):
        model = resnet18(device)
        opt = opt_factory(model)
        if penalty is not None:
            mas_optim.add_mas_penalty(opt, reg_params_for(model), reg_lambda=lam, **penalty)

        def run():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    def local(**options):
        return lambda m: mas_optim.LocalSgd(m.named_parameters(), reg_params=reg_params_for(m),
                                            reg_lambda=lam, **hp, **options)

    sgd = {"LocalSgd": runner(local()),
           "LocalSgd uncached": runner(local(cache_penalty=False)),
           "LocalSgd single-tensor": runner(local(fused=False)),
           "torch SGD fused": runner(lambda m: torch.optim.SGD(m.parameters(), fused=True, **hp))}
    if compiled:
        sgd["LocalSgd compiled"] = runner(local(fused=True))
    adamw = lambda **o: (lambda m: torch.optim.AdamW(m.named_parameters(), lr=1e-3, **o))  # noqa: E731
    return {
        "sgd": against(runner(lambda m: torch.optim.SGD(m.parameters(), foreach=True, **hp)),
                       sgd, repeats, inner),
        "adamw": against(runner(adamw(foreach=True)),
                         {"add_mas_penalty": runner(adamw(foreach=True), {})},
                         repeats, inner),
        "adamw fused": against(runner(adamw(fused=True)),
                               {"add_mas_penalty": runner(adamw(fused=True), {})}, repeats,
                               inner),
    }


def step_alone(device: torch.device, repeats: int, inner: int,
               compiled: bool) -> Dict[str, Dict[str, float]]:
    """optimizer.step() alone on ResNet-18's 62 tensors, the same gradients every time."""
    hp, lam = dict(lr=1e-3, momentum=0.9), 0.01

    def local(**options):
        m = resnet18_with_grads(device)
        return mas_optim.LocalSgd(m.named_parameters(), reg_params=reg_params_for(m),
                                  reg_lambda=lam, **hp, **options).step

    def adamw(penalty: Optional[dict] = None):
        m = resnet18_with_grads(device)
        opt = torch.optim.AdamW(m.named_parameters(), lr=1e-3, foreach=True)
        if penalty is not None:
            mas_optim.add_mas_penalty(opt, reg_params_for(m), reg_lambda=lam, **penalty)
        return opt.step

    sgd = {"LocalSgd": local(), "LocalSgd uncached": local(cache_penalty=False),
           "torch SGD fused": torch.optim.SGD(resnet18_with_grads(device).parameters(),
                                              fused=True, **hp).step}
    adam = {"add_mas_penalty": adamw({})}
    if compiled:
        sgd["LocalSgd compiled"] = local(fused=True)
        adam["add_mas_penalty compiled"] = adamw(dict(fused=True))
    return {"sgd": against(torch.optim.SGD(resnet18_with_grads(device).parameters(),
                                           foreach=True, **hp).step, sgd, repeats, inner),
            "adamw": against(adamw(), adam, repeats, inner)}


@contextlib.contextmanager
def foreach_kernels_do_nothing():
    """torch's ``_foreach_*`` kernels replaced by no-ops, so that a step's time is its host
    time: Python, dispatch and the lists handed to the kernels."""
    saved = {k: getattr(torch, k) for k in dir(torch) if k.startswith("_foreach_")}
    for k in saved:
        setattr(torch, k, (lambda *a, **kw: None) if k.endswith("_")
                else (lambda *a, **kw: list(a[0])))
    try:
        yield
    finally:
        for k, f in saved.items():
            setattr(torch, k, f)


def host_time(repeats: int, inner: int) -> Dict[str, Dict[str, float]]:
    """What the host spends per optimizer step on ResNet-18's 62 tensors, on the CPU, every
    optimizer on its multi-tensor path, the kernels doing nothing: on a GPU, where the kernels
    run asynchronously, this is what a launch-bound step waits for."""
    device, hp, lam = torch.device("cpu"), dict(lr=1e-3, momentum=0.9, foreach=True), 0.01

    def stepped(opt):
        for _ in range(3):  # real steps first: momentum buffers, Adam's moments, plans
            opt.step()
        return opt.step

    def adamw(penalty: bool):
        m = resnet18_with_grads(device)
        opt = torch.optim.AdamW(m.named_parameters(), lr=1e-3, foreach=True)
        if penalty:
            mas_optim.add_mas_penalty(opt, reg_params_for(m), reg_lambda=lam, foreach=True)
        return stepped(opt)

    def local(head_entry: bool = True):
        m = resnet18_with_grads(device)
        reg = {n: e for n, e in reg_params_for(m).items() if head_entry or not n.startswith("fc.")}
        return stepped(mas_optim.LocalSgd(m.named_parameters(), reg_params=reg, reg_lambda=lam,
                                          **hp))

    sgd = stepped(torch.optim.SGD(resnet18_with_grads(device).parameters(), **hp))
    candidates = {"LocalSgd": local(), "LocalSgd, head without entry": local(head_entry=False)}
    penalised, plain = adamw(True), adamw(False)
    with foreach_kernels_do_nothing():
        return {"sgd": against(sgd, candidates, repeats, inner),
                "adamw": against(plain, {"add_mas_penalty": penalised}, repeats, inner)}


def _loop_body(ps, gs, bs, omegas, inits, lr, momentum, dampening, weight_decay, coef,
               use_momentum, nesterov, maximize):
    """The compiled step written one tensor at a time (the library's until this benchmark)."""
    for i in range(len(ps)):
        p = ps[i]
        g = -gs[i] if maximize else gs[i]
        d = g + coef * omegas[i] * (p - inits[i]) + weight_decay * p
        if use_momentum:
            b = momentum * bs[i] + (1 - dampening) * d
            bs[i].copy_(b)
            d = d + momentum * b if nesterov else b
        p.copy_(p - lr * d)


def _renamed(fn, name):
    """A copy of ``fn`` with its own code object, so that torch.compile caches it apart."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


COMPILED_VARIANTS = {  # label: (body, torch.compile's dynamic)
    "foreach static (LocalSgd's)": (local_sgd._fused_kernel_body, None),
    "foreach dynamic": (local_sgd._fused_kernel_body, True),
    "loop static": (_loop_body, None),
    "loop dynamic": (_loop_body, True),
}


def compiled_variants(device: torch.device, repeats: int) -> None:
    """LocalSgd(fused=True)'s compiled step, written and compiled four ways: the step alone
    and the training step at 32x32, against SGD foreach."""
    hp, lam = dict(lr=1e-3, momentum=0.9), 0.01
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def make(label: Optional[str], with_grads: bool):
        model = resnet18_with_grads(device)  # the compiling steps need gradients
        if label is None:
            opt = torch.optim.SGD(model.parameters(), foreach=True, **hp)
        else:
            body, dynamic = COMPILED_VARIANTS[label]
            body = _renamed(body, "v_" + "".join(c if c.isalnum() else "_" for c in label))
            real = local_sgd._compile_fused_kernel
            local_sgd._compile_fused_kernel = lambda: torch.compile(body, dynamic=dynamic,
                                                                    fullgraph=True)
            opt = mas_optim.LocalSgd(model.named_parameters(), reg_params=reg_params_for(model),
                                     reg_lambda=lam, fused=True, **hp)
            try:
                start = clock()
                opt.step()  # the first step creates the momentum buffers
                opt.step()  # compiles
                print(f"    {label}: first two steps {clock() - start:.1f} s")
            finally:
                local_sgd._compile_fused_kernel = real
        if with_grads:
            return opt.step
        opt.zero_grad()

        def run():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    for with_grads, title, inner in ((True, "step alone", 50),
                                     (False, "training step, batch 128 of 32x32", 20)):
        fns = {}
        for label in COMPILED_VARIANTS:
            try:
                fns[label] = make(label, with_grads)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"    {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        r = against(make(None, with_grads), fns, repeats, inner)
        print(f"  LocalSgd(fused=True) compiled variants, {title}, SGD foreach "
              f"{r.pop('baseline_ms'):.3f} ms:  "
              + "   ".join(f"{k} {v:.3f}x" for k, v in r.items()))


def main_host(repeats: int) -> None:
    print(f"CPU, torch {torch.__version__}; host time per optimizer step, the multi-tensor "
          "kernels doing nothing; time / time(torch optimizer), medians of paired repeats")
    r = host_time(repeats, inner=200)
    for key, title in (("sgd", "SGD foreach"), ("adamw", "AdamW foreach")):
        s = r[key]
        print(f"Host time per step, ResNet-18 (62 tensors), {title} {1e3 * s.pop('baseline_ms'):.0f} "
              "us:  " + "   ".join(f"{k} {v:.3f}x" for k, v in s.items()))


def main(device: torch.device, repeats: int, compiled: bool, variants: bool) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; "
          "time / time(torch optimizer), medians of paired repeats")
    for side, batch in SIZES[device.type]:
        r = training_steps(device, side, batch, repeats, inner=20, compiled=compiled)
        s = r["sgd"]
        print(f"ResNet-18 training step, batch {batch} of {side}x{side}")
        print(f"  SGD foreach, {s.pop('baseline_ms'):.2f} ms per step:  "
              + "   ".join(f"{k} {v:.3f}x" for k, v in s.items()))
        for key in ("adamw", "adamw fused"):
            a = r[key]
            print(f"  AdamW {key.split()[-1] if ' ' in key else 'foreach'}, "
                  f"{a['baseline_ms']:.2f} ms per step:  add_mas_penalty {a['add_mas_penalty']:.3f}x")
    r = step_alone(device, repeats, inner=50, compiled=compiled)
    for key, title in (("sgd", "SGD foreach"), ("adamw", "AdamW foreach")):
        s = r[key]
        print(f"Optimizer step alone, ResNet-18 (62 tensors), {title} {s.pop('baseline_ms'):.3f} "
              "ms:  " + "   ".join(f"{k} {v:.3f}x" for k, v in s.items()))
    if compiled and variants:
        compiled_variants(device, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="paired repeats (default 11)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip LocalSgd(fused=True), which compiles with torch.compile")
    parser.add_argument("--variants", action="store_true",
                        help="also time four ways of writing and compiling the fused step")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), or cpu for a smoke run of this script")
    parser.add_argument("--host", action="store_true",
                        help="only the host time per optimizer step, measured on the CPU")
    args = parser.parse_args()
    if args.host:
        raise SystemExit(main_host(args.repeats))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    main(torch.device(args.device), args.repeats, compiled=not args.no_compile,
         variants=args.variants)
