r"""The MAS penalty for any torch optimizer (Adam, AdamW, RMSprop, SGD, ...).

:func:`add_mas_penalty` registers a step pre-hook that adds the gradient of paper Eq. 3's
penalty to each regularised parameter's ``.grad`` just before the optimizer's own step:

.. math::
    g \leftarrow g + 2\lambda\,\Omega\odot(\theta - \theta^*) ,

so any optimizer then steps on the gradient of :math:`L_{task} + \lambda\sum\Omega(\theta -
\theta^*)^2` without the penalty ever entering the autograd graph. On the CPU, a one-pass C
kernel adds it; for ``torch.optim.Adam``/``AdamW`` in their default (single-tensor) form the
kernel runs the penalty and the whole Adam update in one pass. (For SGD, :class:`LocalSgd` does
the same.) Example::

    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.01)
    mas = mas_optim.add_mas_penalty(opt, reg_params, reg_lambda=1.0)
    ...  # the usual loop: zero_grad, loss.backward(), opt.step()
    mas.remove()  # plain AdamW again
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _kernels
from ._compiled import DeviceScalars
from ._foreach import ForeachPlan, add_penalty_, penalty_lists
from ._validate import (as_reg_lambda, check_entry, check_reg_params, group_names, is_sharded,
                        local)
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
                 cache_penalty: bool, foreach: Optional[bool], fused: Optional[bool]) -> None:
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
        self.fused = fused
        self._fused_kernel: Any = None
        self._fused_scalars = DeviceScalars()
        self.reg_lambda = as_reg_lambda(reg_lambda)
        self._by_id: Dict[int, str] = {}
        self._cache: Dict[Tensor, _Terms] = {}
        self._plans: Dict[int, ForeachPlan] = {}
        self._reg_params: RegParams = {}
        self.reg_params = reg_params
        self._hidden: List[Tuple[Tensor, Tensor]] = []
        if proximal:
            self._handles = [optimizer.register_step_post_hook(self._after_step)]
        else:
            self._handles = [optimizer.register_step_pre_hook(self._before_step),
                             optimizer.register_step_post_hook(self._restore_grads)]

    @property
    def reg_params(self) -> RegParams:
        return self._reg_params

    @reg_params.setter
    def reg_params(self, reg_params: RegParams) -> None:
        check_reg_params(reg_params, dict(self._named_params()))
        self._reg_params = reg_params
        self._cache = {}

    @property
    def attached(self) -> bool:
        """Whether the penalty still acts on :attr:`optimizer` (False after :meth:`remove`)."""
        handle = self._handles[0]
        hooks = handle.hooks_dict_ref()
        return hooks is not None and handle.id in hooks

    def remove(self) -> None:
        """Detach the penalty: the optimizer steps on the task gradient alone again."""
        for handle in self._handles:
            handle.remove()

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
        """(parameters, terms, names) of the group's parameters that have a gradient and an
        entry."""
        params, terms, names = [], [], []
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
            names.append(name)
        return params, terms, names

    # ------------------------------------------------------------------ hooks

    def _before_step(self, optimizer, args, kwargs):
        # args are step's own: (optimizer, [closure])
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._restore_grads(optimizer, args, kwargs)
            self._add_penalty(optimizer, take_over=True)
            return None

        # step(closure) computes the gradient inside step, after this hook: the penalty goes
        # into the closure, and its value into the loss the optimizer sees (LBFGS's line
        # search compares losses).
        def closure_with_penalty():
            loss = closure()
            self._add_penalty(optimizer, take_over=False)
            return loss if loss is None else loss + self.penalty().to(loss)

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_with_penalty)
        return (args[0], closure_with_penalty, *args[2:]), kwargs

    @torch.no_grad()
    def _add_penalty(self, optimizer, take_over: bool) -> None:
        """g += 2λΩ(θ − θ*) for every regularised parameter with a gradient. ``take_over``: for
        Adam/AdamW (see :meth:`_adam_kernel_applies`), the kernel runs the whole update of
        these parameters instead, and hides their gradients from the optimizer's step."""
        for i, group in enumerate(optimizer.param_groups):
            coef = 2.0 * as_reg_lambda(group.get("reg_lambda", self.reg_lambda))
            if coef == 0:
                continue
            # maximize=True ascends the gradient; the penalty must still be descended.
            sign = -1.0 if group.get("maximize", False) else 1.0
            switches = (coef, sign, self.foreach, self.fused, self.cache_penalty)
            plan = self._plans.pop(i, None)
            if plan is not None:
                planned = plan.grads(group["params"], switches, self._reg_params)
                if planned is not None:
                    add_penalty_(planned[0], plan.ps, plan.penalty, sign)
                    self._plans[i] = plan
                    continue
            params, terms, names = self._regularised(group, i, coef)
            if not params:
                continue
            grads = [local(p.grad) for p in params]
            ps = [local(p) for p in params]
            kernels = self._kernels(ps)
            if kernels is not None:
                if take_over and self._adam_kernel_applies(optimizer, group):
                    params, grads, ps, terms = self._kernel_adam(
                        kernels, optimizer, group, params, grads, ps, terms, coef, sign)
                if grads:
                    grads, ps, terms = _kernel_penalty(kernels, grads, ps, terms, sign * coef)
                if not grads:
                    continue
            if self.fused and self._fused_add(grads, ps, terms, sign * coef):
                continue
            foreach = self.foreach
            if foreach is None:
                foreach = all(g.device.type == "cuda" for g in grads)
            if foreach:  # one kernel launch per pass for the whole group
                penalty = penalty_lists(terms)
                add_penalty_(grads, ps, penalty, sign)
                # Every penalised parameter took it, none sharded: the next step may use these
                # lists (see mas_optim._foreach).
                if kernels is None and not any(is_sharded(p) for p in params):
                    self._plans[i] = ForeachPlan.build(
                        group["params"], self._names(group, i), switches,
                        [(p, n, self._reg_params[n]) for p, n in zip(params, names)], penalty,
                        others_step_alone=True)
                continue
            for g, p, t in zip(grads, ps, terms):  # on the CPU: slices that stay in cache
                if self.cache_penalty:
                    for g_, p_, s_, o_ in _slices(g, p, t.slope, t.offset):
                        g_.addcmul_(s_, p_, value=sign).sub_(o_, alpha=sign)
                else:
                    for g_, p_, o_, i_ in _slices(g, p, local(t.omega), local(t.init)):
                        g_.addcmul_(o_, torch.sub(p_, i_), value=sign * coef)

    # ------------------------------------------------------------------ Adam / AdamW in one pass

    @staticmethod
    def _adam_kernel_applies(optimizer: torch.optim.Optimizer, group: Mapping) -> bool:
        """Whether the group's step is torch's single-tensor Adam/AdamW, which the kernel
        reproduces: the exact class (a subclass may change the step), no hyperparameter this
        code does not know, and none of amsgrad, capturable, differentiable, fused, foreach."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return False
        if not set(optimizer.defaults) <= _ADAM_KEYS:
            return False
        if any(group.get(k) for k in ("amsgrad", "capturable", "differentiable", "fused",
                                       "foreach")):
            return False
        return not any(isinstance(group[k], Tensor) for k in ("weight_decay", "eps")) and \
            not any(isinstance(b, Tensor) for b in group["betas"])

    def _kernel_adam(self, kernels: _kernels.Kernels, optimizer: torch.optim.Optimizer,
                     group: Mapping, params: List[Tensor], grads: List[Tensor],
                     ps: List[Tensor], terms: List[_Terms], coef: float, sign: float):
        """The penalty and torch's Adam/AdamW update in one pass (``csrc/mas_kernels.c``) for
        every parameter the kernel fits; their gradients are hidden from the optimizer's own
        step (and given back after it). Returns (params, grads, ps, terms) of the others."""
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd, eps = float(group["weight_decay"]), float(group["eps"])
        decoupled = bool(group.get("decoupled_weight_decay", False))
        flags = ((_kernels.DECAY if wd != 0 else 0)
                 | (_kernels.DECOUPLED if wd != 0 and decoupled else 0)
                 | (_kernels.LERP_END if abs(1 - beta1) >= 0.5 else 0))
        # As torch.optim.adam._single_tensor_adam computes them, in Python floats.
        scalars = (coef, sign, wd, 1 - lr * wd, 1 - beta1, beta2, 1 - beta2, eps)
        rest: Tuple[list, list, list, list] = ([], [], [], [])
        by_dtype: Dict[torch.dtype, Tuple[List[List[int]], List[List[float]]]] = {}
        state = optimizer.state
        for p, g, lp, t in zip(params, grads, ps, terms):
            st = state[p]
            if not st:  # as torch's Adam initialises it, so its state dict is the same
                st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_t = st.get("step")
            m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            if (not isinstance(step_t, Tensor) or step_t.device.type != "cpu" or m is None
                    or v is None or not t.fit_kernels(lp, g, local(m), local(v))):
                for xs, x in zip(rest, (p, g, lp, t)):
                    xs.append(x)
                continue
            step_t += 1
            step = step_t.item()
            rows, steps = by_dtype.setdefault(lp.dtype, ([[] for _ in range(8)], [[], []]))
            ptrs = t.kernel_ptrs
            for row, value in zip(rows, (ptrs[0], g.data_ptr(), local(m).data_ptr(),
                                         local(v).data_ptr(), ptrs[1], ptrs[2], lp.numel(),
                                         flags)):
                row.append(value)
            steps[0].append(-lr / (1 - beta1 ** step))
            steps[1].append((1 - beta2 ** step) ** 0.5)
            self._hidden.append((p, p.grad))
        for dtype, (rows, steps) in by_dtype.items():
            kernels.adam(dtype, rows, steps, scalars)
        for p, _ in self._hidden:
            p.grad = None
        return rest

    def _restore_grads(self, optimizer, args, kwargs) -> None:
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []

    def _kernels(self, ps: List[Tensor]) -> Optional[_kernels.Kernels]:
        """The one-pass C kernel where it applies: ``fused`` not False, ``foreach`` not True,
        parameters on the CPU, and a C compiler that built it."""
        if self.fused is False or self.foreach or ps[0].device.type != "cpu":
            return None
        return _kernels.load()

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
                               *self._fused_scalars.get((coef,), ps[0]))
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
            for p, t, _ in zip(*self._regularised(group, i, coef)):
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
    fused: Optional[bool] = None,
) -> MasPenalty:
    r"""Attach the MAS penalty λ Σ Ω (θ − θ*)² (paper Eq. 3) to any torch optimizer.

    A step pre-hook adds 2λΩ(θ − θ*) to ``.grad`` of every regularised parameter, so the
    optimizer's step equals its step on ``loss + λ Σ Ω (θ − θ*)²`` through autograd (for
    ``maximize=True`` groups the penalty is still descended). With ``step(closure)`` (LBFGS)
    the penalty is added inside the closure, after it computed the gradient, and its value to
    the loss the closure returns. The optimizer's state dict is untouched (a group may set its
    own ``"reg_lambda"``, which is then saved with it). Hooks are not pickled by torch: after
    ``copy.deepcopy``/``pickle`` of the optimizer, attach again.

    The penalty is added when ``step()`` runs, after any gradient clipping (and after
    ``GradScaler.unscale_``): clipping sees the task gradient only. After the step, ``.grad``
    holds the task gradient plus the penalty, except where the Adam kernel ran (below): there
    it is the task gradient, as the kernel never writes it.

    How it is added, on the CPU: by default (``fused=None``) with the one-pass C kernel of
    ``csrc/mas_kernels.c`` (reads g, θ, Ω, θ* once; built at first use, eager where no C
    compiler works or a tensor doesn't fit it). For ``torch.optim.Adam``/``AdamW`` of exactly
    that class, without amsgrad/foreach/fused/capturable/differentiable, the kernel does the
    penalty *and* torch's single-tensor Adam update in one pass for the regularised
    parameters, keeping the optimizer's state as torch keeps it, and hides their gradients
    from the optimizer's own step (its other parameters step as usual). The result equals
    torch's step on the penalised gradient to rounding (tested at 1e-12 in float64).

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
        cache_penalty: on the eager paths, keep 2λΩ and 2λΩθ* per parameter (two tensors of
            its size) for one pass less per step; off by default, so the penalty costs no
            memory beyond reg_params.
        foreach: add the penalty with torch's multi-tensor kernels (default: on CUDA, as torch's
            optimizers choose); otherwise one parameter at a time.
        fused: ``None`` (default): the C kernel on the CPU; ``True``: also, off the CPU (or
            without the C kernel), one ``torch.compile``'d pass per parameter (compiled at the
            first step; where that fails, one warning and the eager path); ``False``: the eager
            path only.

    Returns:
        a :class:`MasPenalty`; ``.remove()`` detaches it, ``.penalty()`` gives its value.
    """
    return MasPenalty(optimizer, reg_params, reg_lambda, model=model, proximal=proximal,
                      cache_penalty=cache_penalty, foreach=foreach, fused=fused)


_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
              "differentiable", "fused", "decoupled_weight_decay"}


def _scalar_dtype() -> torch.dtype:
    # The dtype torch's Adam gives state["step"] on the CPU.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _kernel_penalty(kernels: _kernels.Kernels, grads: List[Tensor], ps: List[Tensor],
                    terms: List[_Terms], coef: float):
    """g += coef·Ω(θ − θ*) by the C kernel, one call per dtype, for every parameter it fits;
    returns (grads, params, terms) of the others."""
    rest: Tuple[List[Tensor], List[Tensor], List[_Terms]] = ([], [], [])
    by_dtype: Dict[torch.dtype, List[List[int]]] = {}
    for g, p, t in zip(grads, ps, terms):
        if not t.fit_kernels(p, g):
            for xs, x in zip(rest, (g, p, t)):
                xs.append(x)
            continue
        rows = by_dtype.get(p.dtype)
        if rows is None:
            rows = by_dtype[p.dtype] = [[], [], [], [], []]
        ptrs = t.kernel_ptrs
        rows[0].append(g.data_ptr())
        rows[1].append(ptrs[0])
        rows[2].append(ptrs[1])
        rows[3].append(ptrs[2])
        rows[4].append(p.numel())
    for dtype, rows in by_dtype.items():
        kernels.penalty(dtype, rows, coef)
    return rest


def _fused_penalty_body(grads: List[Tensor], params: List[Tensor], omegas: List[Tensor],
                        inits: List[Tensor], coef: Tensor) -> None:
    # One pass per parameter once compiled; coef is a 0-dim tensor so a new λ does not recompile.
    for i in range(len(grads)):
        grads[i].copy_(grads[i] + coef * omegas[i] * (params[i] - inits[i]))
