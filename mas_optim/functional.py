r"""The MAS update as functions over lists of tensors, shaped like ``torch.optim.sgd.sgd``.

:class:`~mas_optim.LocalSgd` and :func:`~mas_optim.add_mas_penalty` both update through these
functions; nothing else in the library changes a parameter or a gradient. For a parameter θ
with importance Ω and anchor θ* the penalty of paper Eq. 3, λ Σ Ω (θ − θ*)², has the gradient

.. math::
    P(\theta) = 2\lambda\,\Omega\odot(\theta - \theta^*) .

* :func:`mas_sgd`, explicit (``proximal=False``): torch's SGD on the task gradient plus P,

  .. math::
      d_t &= \pm g_t + wd\,\theta_{t-1} + P(\theta_{t-1}) \quad (\pm: \text{maximize negates
      only } g) \\
      b_t &= \mu\,b_{t-1} + (1 - \tau)\,d_t \quad (b_1 = d_1) \\
      \theta_t &= \theta_{t-1} - \gamma\,(d_t + \mu b_t \text{ if nesterov else } b_t)

  ``proximal=True``: the same step without P, then the exact proximal map of γλΣΩ(θ − θ*)²,
  :math:`\theta_t \leftarrow \theta^* + (\theta_t - \theta^*) / (1 + 2\gamma\lambda\Omega)`.
  Neither writes ``grads``.
* :func:`add_penalty_`: :math:`g \leftarrow g \pm P(\theta)` (− where the host maximizes), for
  any optimizer to step on.
* :func:`proximal_`: the proximal map alone.

Implementations, picked in one place (:func:`implementation`):

* ``"single_tensor"``: torch ops one tensor at a time; every dtype, layout and device. The
  reference.
* ``"foreach"``: torch's multi-tensor ``_foreach_*`` kernels, one launch per pass for a whole
  list. The default on CUDA, as for torch's optimizers.
* ``"fused"`` (:func:`mas_sgd` only): one pass per tensor in C (``csrc/mas_kernels.c``, built
  at first use), for CPU float32/float64 tensors; the default on the CPU. A tensor it cannot
  take (another dtype, not contiguous, sharing memory with another) takes the single-tensor
  step. There is none for other devices (``fused=True`` there takes ``"foreach"``), nor for
  :func:`add_penalty_` (on the CPU it is single-tensor). Each choice is measured in
  docs/speed.md.

Parameters may be FSDP2 DTensors: the update is elementwise, so each rank updates its own
shards (Ω, θ* and momentum buffers sharded like the parameters).
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd

from . import _kernels
from ._validate import is_sharded, local

__all__ = ["add_penalty_", "implementation", "mas_sgd", "penalty", "proximal_"]

# The single-tensor step cuts CPU tensors of more than _SLICE_ABOVE elements into slices of
# _CHUNK elements (smaller ones already fit in the last-level cache).
_CHUNK = 1 << 18
_SLICE_ABOVE = 1 << 20


def implementation(params: Sequence[Tensor], *, foreach: Optional[bool] = None,
                   fused: Optional[bool] = None, penalty_only: bool = False) -> Tuple[str, str]:
    """The implementation :func:`mas_sgd` (or, with ``penalty_only``, :func:`add_penalty_`)
    takes for ``params`` with these options, and why: ``("fused" | "foreach" |
    "single_tensor", reason)``.

    ``foreach``/``fused`` as in ``torch.optim.SGD``; ``None`` picks the default of the
    parameters' device.
    """
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    devices = {local(p).device.type for p in params}
    if penalty_only and not foreach and devices == {"cpu"}:
        return "single_tensor", ("the penalty alone has no fused step (a C kernel measured no "
                                 "faster, docs/speed.md); torch's default on the CPU")
    if fused is not False and not foreach and devices == {"cpu"}:
        if _kernels.load() is not None:
            return "fused", "CPU tensors: the one-pass C kernel (csrc/mas_kernels.c)"
        return "single_tensor", f"no C kernel on this machine: {_kernels.reason()}"
    if fused:
        return "foreach", (f"fused=True on {'/'.join(sorted(devices))}: the fused step is "
                           "CPU-only (docs/speed.md), so torch's foreach kernels")
    if foreach or (foreach is None and fused is None and devices == {"cuda"}):
        return "foreach", ("foreach=True" if foreach else "CUDA tensors: torch's foreach "
                           "kernels, as torch's optimizers default to")
    return "single_tensor", "foreach=False/fused=False" if (
        foreach is False or fused is False) else f"the default on {'/'.join(sorted(devices))}"


def _pick(params: Sequence[Tensor], foreach: Optional[bool], fused: Optional[bool],
          penalty_only: bool = False) -> str:
    impl, why = implementation(params, foreach=foreach, fused=fused, penalty_only=penalty_only)
    if fused and impl != "fused" and any(local(p).device.type == "cpu" for p in params):
        warnings.warn(f"fused=True: {why}; using the {impl} step", RuntimeWarning, stacklevel=3)
    return impl


@torch.no_grad()
def mas_sgd(params: List[Tensor], grads: List[Tensor],
            momentum_buffer_list: List[Optional[Tensor]], omegas: List[Optional[Tensor]],
            init_vals: List[Optional[Tensor]], *, reg_lambda: float, lr: float, momentum: float,
            dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
            proximal: bool = False, foreach: Optional[bool] = None,
            fused: Optional[bool] = None) -> None:
    """One MAS step of ``params`` in place (the math is in the module's docstring).

    ``omegas[i]``/``init_vals[i]`` None: no penalty for ``params[i]`` (torch's SGD step).
    ``momentum_buffer_list``: entries None are created (``b_1 = d_1``) and written back, as
    torch's ``sgd()`` does; the caller keeps them. ``grads`` are never written.
    """
    impl = _pick(params, foreach, fused)
    coef = 2.0 * reg_lambda
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize)
    pen = [i for i, o in enumerate(omegas) if o is not None and coef != 0]
    taken = set(pen) if not proximal or impl == "fused" else set()
    plain = [i for i in range(len(params)) if i not in taken]
    if plain:  # torch's own SGD step
        bufs = [momentum_buffer_list[i] for i in plain]
        gs = [grads[i] for i in plain]
        _torch_sgd([params[i] for i in plain], gs, bufs, foreach=impl == "foreach",
                   has_sparse_grad=any(g.is_sparse for g in gs), **hyper)
        for i, b in zip(plain, bufs):
            momentum_buffer_list[i] = b
    if not pen:
        return
    if any(grads[i].is_sparse for i in pen):
        raise RuntimeError("the MAS penalty does not support sparse gradients")
    if not taken:  # proximal, after torch's step above
        proximal_([params[i] for i in pen], [omegas[i] for i in pen],  # type: ignore[misc]
                  [init_vals[i] for i in pen], lr=lr, reg_lambda=reg_lambda, foreach=foreach)
        return
    if momentum != 0:
        fresh = [i for i in pen if momentum_buffer_list[i] is None]
        for i in fresh:  # b_0 = 0 with τ = 0 gives b_1 = d_1; created like the parameter
            momentum_buffer_list[i] = torch.zeros_like(params[i])
        if fresh:
            _explicit(impl, fresh, params, grads, momentum_buffer_list, omegas, init_vals,
                      coef, proximal, dict(hyper, dampening=0.0))
            pen = [i for i in pen if i not in set(fresh)]
    if pen:
        _explicit(impl, pen, params, grads, momentum_buffer_list, omegas, init_vals, coef,
                  proximal, hyper)


def _explicit(impl: str, idx: List[int], params, grads, bufs, omegas, init_vals, coef: float,
              proximal: bool, hyper: dict) -> None:
    ps, gs, os_, cs = ([local(xs[i]) for i in idx] for xs in (params, grads, omegas, init_vals))
    bs = [local(bufs[i]) if hyper["momentum"] != 0 else None for i in idx]
    if impl == "fused":
        rest = _fused_sgd(ps, gs, bs, os_, cs, coef, proximal, **hyper)
        for ps_i, gs_i, bs_i, os_i, cs_i in rest:
            if proximal:  # a tensor the kernel cannot take: SGD step, then the map
                _torch_sgd([ps_i], [gs_i], [bs_i], foreach=False, **hyper)
                proximal_([ps_i], [os_i], [cs_i], lr=hyper["lr"], reg_lambda=coef / 2)
            else:
                _single_tensor_mas_sgd(ps_i, gs_i, bs_i, os_i, cs_i, coef, **hyper)
    elif impl == "foreach":
        _multi_tensor_mas_sgd(ps, gs, bs, os_, cs, coef, **hyper)
    else:
        for args in zip(ps, gs, bs, os_, cs):
            _single_tensor_mas_sgd(*args, coef, **hyper)


def _single_tensor_mas_sgd(p: Tensor, g: Tensor, b: Optional[Tensor], omega: Tensor,
                           init: Tensor, coef: float, **hyper) -> None:
    tensors = (p, g, b if b is not None else p, omega, init)
    if p.numel() <= _SLICE_ABOVE or p.device.type != "cpu" or not all(
            t.is_contiguous() for t in tensors):
        _mas_sgd_one(p, g, b, omega, init, coef, **hyper)
        return
    # On the CPU, a large tensor slice by slice, so that every pass after the first reads its
    # slice from cache (MLP 784-2000-2000-10: 5-8% less time per training step, docs/speed.md).
    for p_, g_, b_, o_, c_ in zip(*(t.view(-1).split(_CHUNK) for t in tensors)):
        _mas_sgd_one(p_, g_, b_ if b is not None else None, o_, c_, coef, **hyper)


def _mas_sgd_one(p: Tensor, g: Tensor, b: Optional[Tensor], omega: Tensor, init: Tensor,
                 coef: float, *, lr: float, momentum: float, dampening: float,
                 weight_decay: float, nesterov: bool, maximize: bool) -> None:
    d = torch.sub(p, init).mul_(omega).mul_(coef)          # P = 2λΩ(θ − θ*)   (Eq. 3)
    d.add_(g, alpha=-1.0 if maximize else 1.0)
    if weight_decay != 0:
        d.add_(p, alpha=weight_decay)
    if momentum != 0:
        b.mul_(momentum).add_(d, alpha=1.0 - dampening)   # type: ignore[union-attr]
        d = d.add_(b, alpha=momentum) if nesterov else b  # type: ignore[arg-type]
    p.add_(d, alpha=-lr)


def _multi_tensor_mas_sgd(ps: List[Tensor], gs: List[Tensor], bs: List[Optional[Tensor]],
                          omegas: List[Tensor], inits: List[Tensor], coef: float, *, lr: float,
                          momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool, maximize: bool) -> None:
    d = torch._foreach_sub(ps, inits)
    torch._foreach_mul_(d, omegas)
    torch._foreach_mul_(d, coef)                              # P = 2λΩ(θ − θ*)
    torch._foreach_add_(d, gs, alpha=-1.0 if maximize else 1.0)
    if weight_decay != 0:
        torch._foreach_add_(d, ps, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(bs, momentum)  # type: ignore[arg-type]
        torch._foreach_add_(bs, d, alpha=1.0 - dampening)  # type: ignore[arg-type]
        if nesterov:
            torch._foreach_add_(d, bs, alpha=momentum)  # type: ignore[arg-type]
        else:
            d = bs  # type: ignore[assignment]
    torch._foreach_add_(ps, d, alpha=-lr)


def _fused_sgd(ps, gs, bs, omegas, inits, coef: float, proximal: bool, *, lr: float,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool,
               maximize: bool) -> List[tuple]:
    """The C kernel for every tensor it can take, one call per dtype; returns the others as
    (θ, g, b, Ω, θ*)."""
    kernels = _kernels.load()
    flags = ((_kernels.MOMENTUM if momentum != 0 else 0) | (_kernels.NESTEROV if nesterov else 0)
             | (_kernels.PROXIMAL if proximal else 0)
             | (_kernels.DECAY if weight_decay != 0 else 0))
    rows: dict = {}
    rest = []
    for item in zip(ps, gs, bs, omegas, inits):
        p, g, b, o, c = item
        if kernels is None or not _kernels.fits(p, g, b, o, c):
            rest.append(item)
            continue
        row = (p.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr(), o.data_ptr(),
               c.data_ptr(), p.numel(), flags)
        rows.setdefault(p.dtype, []).append(row)
    scalars = (lr, momentum, dampening, weight_decay, coef, -1.0 if maximize else 1.0)
    for dtype, entries in rows.items():
        kernels.sgd(dtype, list(zip(*entries)), scalars)  # type: ignore[union-attr]
    return rest


@torch.no_grad()
def add_penalty_(grads: List[Tensor], params: List[Tensor], omegas: List[Tensor],
                 init_vals: List[Tensor], *, reg_lambda: float, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None) -> None:
    """``g ← g + 2λΩ(θ − θ*)`` in place for each gradient (``−`` with ``maximize``, so that a
    maximizing optimizer still descends the penalty)."""
    coef = (-2.0 if maximize else 2.0) * reg_lambda
    if coef == 0 or not grads:
        return
    gs, ps, os_, cs = ([local(t) for t in xs] for xs in (grads, params, omegas, init_vals))
    impl = _pick(params, foreach, fused, penalty_only=True)
    if impl == "foreach":
        torch._foreach_addcmul_(gs, os_, torch._foreach_sub(ps, cs), value=coef)
        return
    for g, p, o, c in zip(gs, ps, os_, cs):
        g.addcmul_(o, torch.sub(p, c), value=coef)


@torch.no_grad()
def proximal_(params: List[Tensor], omegas: List[Tensor], init_vals: List[Tensor], *,
              lr: float, reg_lambda: float, foreach: Optional[bool] = None) -> None:
    """θ ← θ* + (θ − θ*) / (1 + 2·lr·λ·Ω): the proximal map of lr·λ·ΣΩ(θ − θ*)²."""
    ps, os_, cs = ([local(t) for t in xs] for xs in (params, omegas, init_vals))
    lr_coef = 2.0 * lr * reg_lambda
    if not ps or lr_coef == 0:
        return
    if implementation(params, foreach=foreach, penalty_only=True)[0] == "foreach":
        d = torch._foreach_sub(ps, cs)
        den = torch._foreach_mul(os_, lr_coef)
        torch._foreach_add_(den, 1.0)
        torch._foreach_div_(d, den)
        torch._foreach_add_(d, cs)
        torch._foreach_copy_(ps, d)
        return
    for p, o, c in zip(ps, os_, cs):
        d = torch.sub(p, c).div_(torch.mul(o, lr_coef).add_(1.0))
        torch.add(c, d, out=p)


@torch.no_grad()
def penalty(terms: Iterable[Tuple[float, Tensor, Tensor, Tensor]]) -> Tensor:
    """λ Σ Ω (θ − θ*)² (Eq. 3) over ``(λ, θ, Ω, θ*)``, for logging: a 0-dim tensor (0.0 for
    no terms). With sharded parameters every rank must call it (the total is a collective)."""
    total: Optional[Tensor] = None
    for lam, p, omega, init in terms:
        term = (omega * (p - init).square()).sum() * lam
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total.full_tensor() if is_sharded(total) else total
