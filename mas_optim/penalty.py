r"""The MAS penalty for any torch optimizer (Adam, AdamW, RMSprop, SGD, ...).

:func:`add_mas_penalty` registers a step pre-hook that adds the gradient of paper Eq. 3's
penalty to each regularised parameter's ``.grad`` just before the optimizer's own step:

.. math::
    g \leftarrow g + 2\lambda\,\Omega\odot(\theta - \theta^*) ,

so any optimizer then steps on the gradient of :math:`L_{task} + \lambda\sum\Omega(\theta -
\theta^*)^2` without the penalty ever entering the autograd graph. (For SGD, :class:`LocalSgd`
does the same inside a fused update and is faster.) Example::

    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.01)
    mas = mas_optim.add_mas_penalty(opt, reg_params, reg_lambda=1.0)
    ...  # the usual loop: zero_grad, loss.backward(), opt.step()
    mas.remove()  # plain AdamW again
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ._validate import as_reg_lambda, check_entry, check_reg_params, group_names, local
from .local_sgd import LocalSgd, _penalty, _proximal_, _slices, _Terms
from .reg_params import RegParams

__all__ = ["MasPenalty", "add_mas_penalty"]


class MasPenalty:
    """The MAS penalty attached to an optimizer by :func:`add_mas_penalty`.

    Attributes:
        reg_params: ``{name: {"omega", "init_val"}}``; assignment is checked like LocalSgd's.
        reg_lambda: λ of Eq. 3 for groups that do not set ``"reg_lambda"`` themselves.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, reg_params: RegParams,
                 reg_lambda: float, *, model: Optional[nn.Module], proximal: bool,
                 cache_penalty: bool, foreach: Optional[bool], fused: bool) -> None:
        if isinstance(optimizer, LocalSgd):
            raise TypeError("LocalSgd already applies the MAS penalty: give it reg_params "
                            "instead of adding a second penalty")
        if proximal and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"proximal=True is defined for torch.optim.SGD, whose step is θ − lr·d; "
                f"{type(optimizer).__name__} rescales each coordinate's step by its own "
                "statistics, for which θ* + (θ − θ*)/(1 + 2·lr·λ·Ω) is not the proximal step: "
                "use proximal=False (the penalty gradient)")
        self.optimizer = optimizer
        self.model = model
        self.proximal = proximal
        self.cache_penalty = cache_penalty
        self.foreach = foreach
        self.fused = bool(fused)
        self._fused_kernel: Any = None
        self.reg_lambda = as_reg_lambda(reg_lambda)
        self._by_id: Dict[int, str] = {}
        self._cache: Dict[Tensor, _Terms] = {}
        self._reg_params: RegParams = {}
        self.reg_params = reg_params
        if proximal:
            self._handle = optimizer.register_step_post_hook(self._after_step)
        else:
            self._handle = optimizer.register_step_pre_hook(self._before_step)

    @property
    def reg_params(self) -> RegParams:
        return self._reg_params

    @reg_params.setter
    def reg_params(self, reg_params: RegParams) -> None:
        check_reg_params(reg_params, dict(self._named_params()))
        self._reg_params = reg_params
        self._cache = {}

    def remove(self) -> None:
        """Detach the penalty: the optimizer steps on the task gradient alone again."""
        self._handle.remove()

    # ------------------------------------------------------------------ names

    def _names(self, group: Mapping, index: int) -> List[Optional[str]]:
        names = group_names(group, index)
        if self.model is not None and None in names:
            params = group["params"]
            if any(id(p) not in self._by_id for p, n in zip(params, names) if n is None):
                self._by_id = {id(p): n for n, p in self.model.named_parameters()}
            names = [n if n is not None else self._by_id.get(id(p))
                     for n, p in zip(names, params)]
        return names

    def _named_params(self):
        for i, group in enumerate(self.optimizer.param_groups):
            for name, p in zip(self._names(group, i), group["params"]):
                if name is not None:
                    yield name, p

    def _regularised(self, group: Mapping, index: int, coef: float):
        """(parameters, terms) of the group's parameters that have a gradient and an entry."""
        params, terms = [], []
        for name, p in zip(self._names(group, index), group["params"]):
            entry = self._reg_params.get(name) if name is not None else None
            if entry is None or p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"the MAS penalty does not support sparse gradients ({name})")
            omega, init = entry["omega"], entry["init_val"]
            t = self._cache.get(p)
            key = (coef, omega._version, init._version, tuple(p.shape))
            if t is None or t.key != key or t.omega is not omega or t.init is not init:
                check_entry(name, entry, p)
                t = self._cache[p] = _Terms(key, omega, init, coef, self.cache_penalty)
            params.append(p)
            terms.append(t)
        return params, terms

    # ------------------------------------------------------------------ hooks

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        for i, group in enumerate(optimizer.param_groups):
            coef = 2.0 * as_reg_lambda(group.get("reg_lambda", self.reg_lambda))
            if coef == 0:
                continue
            params, terms = self._regularised(group, i, coef)
            if not params:
                continue
            # maximize=True ascends the gradient; the penalty must still be descended.
            sign = -1.0 if group.get("maximize", False) else 1.0
            grads = [local(p.grad) for p in params]
            ps = [local(p) for p in params]
            if self.fused and self._fused_add(grads, ps, terms, sign * coef):
                continue
            foreach = self.foreach
            if foreach is None:
                foreach = all(g.device.type == "cuda" for g in grads)
            if foreach:  # one kernel launch per pass for the whole group
                if self.cache_penalty:  # g += 2λΩ·θ − 2λΩθ*
                    torch._foreach_addcmul_(grads, [t.slope for t in terms], ps, value=sign)
                    torch._foreach_add_(grads, [t.offset for t in terms], alpha=-sign)
                else:  # g += 2λ·Ω(θ − θ*)
                    diff = torch._foreach_sub(ps, [local(t.init) for t in terms])
                    torch._foreach_addcmul_(grads, [local(t.omega) for t in terms], diff,
                                            value=sign * coef)
                continue
            for g, p, t in zip(grads, ps, terms):  # on the CPU: slices that stay in cache
                if self.cache_penalty:
                    for g_, p_, s_, o_ in _slices(g, p, t.slope, t.offset):
                        g_.addcmul_(s_, p_, value=sign).sub_(o_, alpha=sign)
                else:
                    for g_, p_, o_, i_ in _slices(g, p, local(t.omega), local(t.init)):
                        g_.addcmul_(o_, torch.sub(p_, i_), value=sign * coef)

    def _fused_add(self, grads: List[Tensor], ps: List[Tensor], terms: List[_Terms],
                   coef: float) -> bool:
        """g += coef·Ω(θ − θ*) in one compiled pass per parameter; False if it can't be built
        (then the caller takes the unfused path, after one warning)."""
        if self._fused_kernel is None:
            self._fused_kernel = torch.compile(_fused_penalty_body, dynamic=True,
                                               fullgraph=True)
        if self._fused_kernel is False:
            return False
        try:
            self._fused_kernel(grads, ps, [local(t.omega) for t in terms],
                               [local(t.init) for t in terms],
                               torch.tensor(coef, dtype=ps[0].dtype, device=ps[0].device))
            return True
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back
            self._fused_kernel = False
            warnings.warn(
                "add_mas_penalty(fused=True): torch.compile could not build the fused penalty "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); using the "
                "unfused one", RuntimeWarning, stacklevel=4)
            return False

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for i, group in enumerate(optimizer.param_groups):
            coef = 2.0 * as_reg_lambda(group.get("reg_lambda", self.reg_lambda))
            if coef == 0:
                continue
            lr = float(group["lr"])
            for p, t in zip(*self._regularised(group, i, coef)):
                _proximal_(local(p), local(t.omega), local(t.init), lr * coef)

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² over the optimizer's regularised parameters (Eq. 3), for logging."""
        return _penalty(self._reg_params, (
            (float(group.get("reg_lambda", self.reg_lambda)), name, p)
            for i, group in enumerate(self.optimizer.param_groups)
            for name, p in zip(self._names(group, i), group["params"])))


def add_mas_penalty(
    optimizer: torch.optim.Optimizer,
    reg_params: RegParams,
    reg_lambda: float = 0.01,
    *,
    model: Optional[nn.Module] = None,
    proximal: bool = False,
    cache_penalty: bool = False,
    foreach: Optional[bool] = None,
    fused: bool = False,
) -> MasPenalty:
    r"""Attach the MAS penalty λ Σ Ω (θ − θ*)² (paper Eq. 3) to any torch optimizer.

    A step pre-hook adds 2λΩ(θ − θ*) to ``.grad`` of every regularised parameter, so the
    optimizer's step equals its step on ``loss + λ Σ Ω (θ − θ*)²`` through autograd (for
    ``maximize=True`` groups the penalty is still descended). The optimizer's state dict is
    untouched (a group may set its own ``"reg_lambda"``, which is then saved with it). Hooks are
    not pickled by torch: after ``copy.deepcopy``/``pickle`` of the optimizer, attach again.

    The penalty is added when ``step()`` runs, after any gradient clipping (and after
    ``GradScaler.unscale_``): clipping sees the task gradient only.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameters are matched to ``reg_params``
            by the names it was built with (``model.named_parameters()``) or, for parameters
            without names, by identity in ``model.named_parameters()``.
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}``.
        reg_lambda: λ ≥ 0 (per group: a ``"reg_lambda"`` key in the group overrides it).
        model: needed when the optimizer was built from unnamed parameters.
        proximal: instead of the gradient, apply the exact proximal map
            θ ← θ* + (θ − θ*)/(1 + 2·lr·λ·Ω) after each step. Defined only for
            ``torch.optim.SGD`` (a step of θ − lr·d); refused for adaptive optimizers, whose
            per-coordinate step sizes make this map something else.
        cache_penalty: keep 2λΩ and 2λΩθ* per parameter (two tensors of its size) for one pass
            less per step; off by default, so the penalty costs no memory beyond reg_params.
        foreach: add the penalty with torch's multi-tensor kernels (default: on CUDA, as torch's
            optimizers choose); otherwise one parameter at a time, in cache-sized slices on
            the CPU.
        fused: add the penalty in one ``torch.compile``'d pass per parameter (reads g, θ, Ω,
            θ* once, no temporary); compiled at the first step, and where that fails (no C++
            compiler, say) one warning and the unfused path.

    Returns:
        a :class:`MasPenalty`; ``.remove()`` detaches it, ``.penalty()`` gives its value.
    """
    return MasPenalty(optimizer, reg_params, reg_lambda, model=model, proximal=proximal,
                      cache_penalty=cache_penalty, foreach=foreach, fused=fused)


def _fused_penalty_body(grads: List[Tensor], params: List[Tensor], omegas: List[Tensor],
                        inits: List[Tensor], coef: Tensor) -> None:
    # One pass per parameter once compiled; coef is a 0-dim tensor so a new λ does not recompile.
    for i in range(len(grads)):
        grads[i].copy_(grads[i] + coef * omegas[i] * (params[i] - inits[i]))
