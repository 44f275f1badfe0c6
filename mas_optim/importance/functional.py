r"""The generic exact path: per-sample gradients by ``torch.func`` over chunks of samples.

For parameters no rule covers, :math:`\sum_k |\nabla_\theta f(\theta; s_k)|` is computed with
``vmap(grad(f))`` over a few samples at a time (as many as
:func:`~mas_optim.importance.base.chunk_size` allows for the parameters involved), where
``f(θ; s_k)`` is either

* a module's own function, ⟨module(θ; input_k), output gradient_k⟩ — its vector-Jacobian
  product, whose gradient is sample k's gradient of θ when the module runs once per forward
  (the engine proves it); this reruns only that module;
* or the whole network, ‖F(x_k; θ)‖² (paper Eq. 2 for one sample).

Where ``vmap`` cannot run a module (an operator without a batching rule that fails), that
module's samples are taken one at a time by plain autograd, and one warning names the module
type.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from .base import chunk_size

# f(params, leaves of one sample, each keeping its sample dimension with size 1) -> scalar
SampleFn = Callable[[Dict[str, Tensor], List[Any]], Tensor]


class Functional:
    """Runs the torch.func path; remembers (for one compute_omega call) modules vmap failed on."""

    def __init__(self) -> None:
        self.loop_only: Set[Tuple[int, ...]] = set()

    def add_abs_sums(self, modules: List[nn.Module], fn: SampleFn, params: Dict[str, Tensor],
                     leaves: List[Any], dims: List[Optional[int]], n: int,
                     acc: Dict[str, Tensor]) -> None:
        """acc[name] += Σ_k |∂fn(params; sample k)/∂params[name]| over the n samples in leaves;
        ``modules`` are the modules fn runs (named in the warning if vmap cannot run them)."""
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        # torch.func.grad differentiates fn's own inputs whatever the outer mode; no_grad keeps
        # the model's other (live) parameters from recording a graph into the sums
        with torch.no_grad():
            self._add_abs_sums(modules, fn, params, leaves, dims, n, acc)

    def _add_abs_sums(self, modules: List[nn.Module], fn: SampleFn, params: Dict[str, Tensor],
                      leaves: List[Any], dims: List[Optional[int]], n: int,
                      acc: Dict[str, Tensor]) -> None:
        key = tuple(id(m) for m in modules)

        def one(p: Dict[str, Tensor], *sample: Any) -> Tensor:
            return fn(p, [t.unsqueeze(d) if d is not None else t for t, d in zip(sample, dims)])

        grad = torch.func.grad(one)
        step = chunk_size(sum(p.numel() for p in params.values()))
        start = 0
        if key not in self.loop_only:
            vmapped = torch.func.vmap(grad, in_dims=(None, *dims))
            try:
                with _ModuleStack(modules) as stack:
                    self._add(acc, vmapped(params, *_narrow(leaves, dims, 0, min(step, n))))
                start = step
            except Exception as e:  # any operator vmap cannot batch: fall back, say so once
                self.loop_only.add(key)
                what = " + ".join(type(m).__name__ for m in modules)
                culprit = type(stack.innermost() or modules[0]).__name__
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                first = first.split(". ")[0][:160]  # the reason, not torch's advice
                warnings.warn(f"compute_omega: torch.func.vmap cannot run "
                              f"{culprit} ({first}); the per-sample gradients "
                              f"through {what} are computed one sample at a time",
                              RuntimeWarning, stacklevel=2)
            else:
                for s in range(start, n, step):
                    self._add(acc, vmapped(params, *_narrow(leaves, dims, s, min(step, n - s))))
                return
        # one sample at a time by plain autograd: torch.func.grad per sample costs about twice
        # as much, and this loop must not be slower than the batch-size-1 loop it replaces
        for k in range(n):
            sample = [t.select(d, k) if d is not None else t for t, d in zip(leaves, dims)]
            p = {name: t.detach().requires_grad_() for name, t in params.items()}
            with torch.enable_grad():
                value = one(p, *sample)
            grads = torch.autograd.grad(value, list(p.values()), allow_unused=True)
            self._add(acc, {name: g.unsqueeze(0) for name, g in zip(p, grads) if g is not None})

    @staticmethod
    def _add(acc: Dict[str, Tensor], grads: Dict[str, Tensor]) -> None:
        for name, g in grads.items():
            acc[name].add_(g.abs().sum(0).to(acc[name].dtype))


def _narrow(leaves: List[Any], dims: List[Optional[int]], start: int, length: int) -> List[Any]:
    return [t.narrow(d, start, length) if d is not None else t for t, d in zip(leaves, dims)]


class _ModuleStack:
    """Which module was running when an exception left it (hooks that pop only on success)."""

    def __init__(self, roots: List[nn.Module]) -> None:
        self.roots, self.stack, self.handles = roots, [], []

    def __enter__(self) -> "_ModuleStack":
        for m in {m: None for root in self.roots for m in root.modules()}:
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))
        return self

    def _enter(self, m: nn.Module, args: tuple) -> None:
        self.stack.append(m)

    def _leave(self, m: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def innermost(self) -> Optional[nn.Module]:
        return self.stack[-1] if self.stack else None
