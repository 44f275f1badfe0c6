r"""LocalSgd: SGD that adds the MAS penalty gradient inside ``step()``.

The MAS objective for a new task is (paper Eq. 3)

.. math::
    L(\theta) = L_{task}(\theta) + \lambda \sum_i \Omega_i (\theta_i - \theta^*_i)^2 ,

so the penalty's gradient is :math:`2\lambda\Omega(\theta - \theta^*)`. It is cheap and local to
each parameter, so, as in the original ``optimizer_lib``, it is added in the optimizer instead of
through autograd: the training graph stays as small as plain SGD's.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd

from . import _kernels
from ._compiled import DeviceScalars
from ._foreach import ForeachPenalty, ForeachPlan, add_penalty_, penalty_lists
from ._validate import as_reg_lambda, check_entry, check_reg_params, group_names, is_sharded, local
from .reg_params import RegParams

# On the CPU, regularised parameters of more than _SLICE_ABOVE elements are updated in slices of
# _CHUNK elements, so that every pass of the update after the first reads θ and the momentum
# buffer from cache. Smaller ones already fit in the last-level cache: slicing only adds calls.
_CHUNK = 1 << 18
_SLICE_ABOVE = 1 << 20
_MAS_KEYS = ("reg_lambda", "proximal")
_NAME_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / DataParallel and torch.compile


class LocalSgd(torch.optim.SGD):
    r"""Drop-in :class:`torch.optim.SGD` with the MAS penalty gradient added in ``step()``.

    For a parameter θ with an entry in ``reg_params`` (Ω, θ*) each step computes

    .. math::
        d_t &= \pm\nabla L_{task}(\theta_{t-1}) + wd\,\theta_{t-1}
               + 2\lambda\,\Omega\odot(\theta_{t-1} - \theta^*)   &&\text{(gradient of Eq. 3)} \\
        b_t &= \mu b_{t-1} + (1 - \tau) d_t \quad (b_1 = d_1)      &&\text{(if } \mu \ne 0) \\
        \theta_t &= \theta_{t-1} - \gamma\,(d_t + \mu b_t \text{ if nesterov else } b_t)

    which is exactly ``torch.optim.SGD`` on the loss plus the penalty. ``maximize`` negates only
    the task gradient: the penalty always pulls θ back toward θ*. Every other parameter gets
    torch's own SGD update: one without an entry (a task head, say) and one without a name (added
    to ``param_groups[i]["params"]`` by a dynamic-model loop such as Avalanche's).

    With ``proximal=True`` the step is torch's SGD on the task gradient alone, followed by the
    exact proximal map of γλΣΩ(θ−θ*)²:  θ ← θ* + (θ − θ*) / (1 + 2γλΩ). The explicit step
    diverges once 2γλΩ > 2; the proximal step is stable for any λ and agrees with the explicit
    one as γλΩ → 0.

    With ``track_path_integral=True`` it also accumulates Synaptic Intelligence's path integral
    w ← w − g ⊙ Δθ at every step (g: the task gradient, Δθ: the change the step made); see
    :meth:`path_integral_omega`.

    Implementations of the same update, chosen like torch's SGD chooses its own:

    * **C kernel** (the default on the CPU): one pass per parameter that reads θ, g, b, Ω and θ*
      once and writes θ and b once (``csrc/mas_kernels.c``; the eager step takes five passes),
      and holds no memory beyond SGD's. It is built at first use with the system's C compiler
      and cached (see :mod:`mas_optim._kernels`); where none works, or for a tensor it can't
      take (not float32/float64, not contiguous, sharing memory with another), the step is
      the eager one below, with the same result.
    * ``foreach`` (the default on CUDA): torch's multi-tensor ``_foreach_*`` kernels.
    * ``fused=True`` off the CPU (or without the C kernel): one ``torch.compile``'d pass per
      parameter; if nothing can be built, one warning and the eager step.
    * ``fused=False``: the eager step, one parameter at a time (in cache-sized slices on the
      CPU). It keeps 2λΩ and 2λΩθ* per regularised parameter (``cache_penalty=True``: two
      tensors of the parameter's size, one pass less); ``cache_penalty=False`` holds neither.

    Args:
        params: ``model.named_parameters()``, or param groups whose ``"params"`` are
            ``(name, tensor)`` pairs; the names key into ``reg_params``. Parameters without names
            are accepted and get torch's SGD update (they have no reg_params entry).
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}`` from :func:`init_reg_params`,
            :func:`consolidate_reg_params` or :func:`load_reg_params`. ``None``: no penalty.
        reg_lambda: λ of Eq. 3 (the paper's; Avalanche's ``lambda_reg`` is 2λ). Per group. Any
            real scalar ≥ 0 (Python, numpy, a 0-dim tensor); a string is refused.
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, fused: as in
            torch.optim.SGD (``foreach``/``fused``: see above; ``fused=None`` takes the C
            kernel on the CPU). ``differentiable=True`` is refused.
        proximal: apply the penalty by its proximal map instead of its gradient.
        track_path_integral: accumulate the SI path integral for :meth:`path_integral_omega`.
        cache_penalty: keep 2λΩ and 2λΩθ* between steps on the eager and foreach paths.
    """

    def __init__(
        self,
        params,
        reg_params: Optional[RegParams] = None,
        reg_lambda: float = 0.01,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        proximal: bool = False,
        track_path_integral: bool = False,
        cache_penalty: bool = True,
    ) -> None:
        if differentiable:
            raise ValueError("LocalSgd does not support differentiable=True: its step updates "
                             "the parameters in place outside autograd")
        self._mas_defaults = {"reg_lambda": as_reg_lambda(reg_lambda),
                              "proximal": bool(proximal)}
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, fused=fused)
        self.defaults.update(self._mas_defaults)
        self.track_path_integral = bool(track_path_integral)
        self.cache_penalty = bool(cache_penalty)
        self._penalty_cache: Dict[Tensor, _Terms] = {}
        self._plans: Dict[int, Union[_GroupPlan, ForeachPlan]] = {}
        self._fused_kernel: Optional[Callable] = None
        self._fused_scalars = DeviceScalars()
        self._reg_params: RegParams = {}
        self.reg_params = reg_params if reg_params is not None else {}

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; the group may set its own ``reg_lambda`` and ``proximal``, and may hold
        parameters without names (they get torch's SGD update)."""
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        if params is not None and not isinstance(params, (set, list)):
            params = list(params)
        if isinstance(params, list):
            param_group["params"] = params
            if "param_names" not in param_group and not any(
                    isinstance(p, tuple) for p in params):
                # torch refuses to mix named and unnamed groups: None stands for "no name".
                param_group["param_names"] = [None] * len(params)
        for key in _MAS_KEYS:
            param_group.setdefault(key, self._mas_defaults[key])
        param_group["reg_lambda"] = as_reg_lambda(param_group["reg_lambda"])
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ copies and state dicts

    def __getstate__(self) -> Dict[str, Any]:
        # torch keeps only defaults/state/param_groups; the penalty needs the rest too.
        state = super().__getstate__()
        state.update(_reg_params=self._reg_params, _mas_defaults=self._mas_defaults,
                     track_path_integral=self.track_path_integral,
                     cache_penalty=self.cache_penalty)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Fill what an older pickle (or load_state_dict's partial state) lacks; the caches are
        # rebuilt on the next step.
        defaults = {"reg_lambda": 0.01, "proximal": False, **self.defaults}
        self.__dict__.setdefault("_mas_defaults", {k: defaults[k] for k in _MAS_KEYS})
        self.__dict__.setdefault("_reg_params", {})
        self.__dict__.setdefault("track_path_integral", False)
        self.__dict__.setdefault("cache_penalty", True)
        self._penalty_cache = {}
        self._plans = {}
        self._fused_kernel = None
        self._fused_scalars = DeviceScalars()
        for group in self.param_groups:
            for key in _MAS_KEYS:
                group.setdefault(key, self._mas_defaults[key])

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's, with two differences that keep the penalty on:

        * the optimizer keeps its own parameter names (they key ``reg_params``). Saved names
          must be the same up to a leading ``module.`` or ``_orig_mod.`` (DDP, DataParallel,
          torch.compile); any other difference is a ``ValueError`` naming the parameter.
        * groups saved without ``reg_lambda``/``proximal`` (a ``torch.optim.SGD`` state dict)
          keep this optimizer's per-group values.
        """
        state_dict = dict(state_dict)
        saved = state_dict.get("param_groups")
        if isinstance(saved, list) and len(saved) == len(self.param_groups):
            groups = []
            for i, (own, group) in enumerate(zip(self.param_groups, saved)):
                group = dict(group)
                _check_same_names(i, group_names(own, i), group.get("param_names"))
                group["param_names"] = list(own["param_names"])
                for key in _MAS_KEYS:
                    group.setdefault(key, own[key])
                groups.append(group)
            state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ reg_params

    @property
    def reg_params(self) -> RegParams:
        """The ``{name: {"omega", "init_val"}}`` dict the penalty uses (checked on assignment,
        and again at the step for any entry or parameter that changed)."""
        return self._reg_params

    @reg_params.setter
    def reg_params(self, reg_params: Mapping[str, Mapping[str, Tensor]]) -> None:
        check_reg_params(reg_params, dict(self._named_params()))
        self._reg_params = reg_params  # type: ignore[assignment]

    def _named_params(self) -> Iterable[Tuple[str, Tensor]]:
        for i, group in enumerate(self.param_groups):
            for name, p in zip(group_names(group, i), group["params"]):
                if name is not None:
                    yield name, p

    def _terms(self, name: Optional[str], p: Tensor, coef: float,
               cache: bool) -> Optional["_Terms"]:
        """The penalty terms of ``p`` (None: no entry), checked whenever the entry or the
        parameter changed: a replaced tensor, an in-place change, a new λ. ``cache``: keep
        2λΩ and 2λΩθ* (only the unfused gradient step reads them)."""
        entry = self._reg_params.get(name) if name is not None else None
        if entry is None:
            return None
        omega, init = entry["omega"], entry["init_val"]
        terms = self._penalty_cache.get(p)
        key = (coef, cache, omega._version, init._version, p.shape)
        if terms is None or terms.key != key or terms.omega is not omega or terms.init is not init:
            check_entry(name, entry, p)
            terms = _Terms(key, omega, init, coef, cache)
            self._penalty_cache[p] = terms
        return terms

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: a callable that re-evaluates the model and returns the loss, or a
                reg_params dict (``optimizer.step(reg_params)``, as the original code calls it),
                which then replaces :attr:`reg_params`.
        """
        if isinstance(closure, Mapping):
            self.reg_params, closure = closure, None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        seen = 0
        for i, group in enumerate(self.param_groups):
            self._step_group(group, i)
            seen += len(group["params"])
        if len(self._penalty_cache) > seen:  # drop terms of parameters that left the optimizer
            live = {p for group in self.param_groups for p in group["params"]}
            self._penalty_cache = {p: t for p, t in self._penalty_cache.items() if p in live}
        return loss

    def _step_group(self, group: dict, index: int) -> None:
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, Tensor) else lr
        coef = 2.0 * float(group["reg_lambda"])
        momentum, proximal, track = group["momentum"], group["proximal"], self.track_path_integral
        kernels = self._kernels(group) if coef != 0 else None
        if not track and coef != 0:
            if kernels is not None:
                if self._planned_kernel_step(kernels, group, index, lr, coef):
                    return
            elif self._planned_foreach_step(group, index, lr, coef):
                return
        plain_p, plain_g, plain_buf = [], [], []
        reg_p, reg_terms, reg_names = [], [], []
        kernel_items: List[Tuple[Tensor, Tensor, Tensor, Optional[Tensor], _Terms]] = []
        cache = (self.cache_penalty and coef != 0 and not proximal and not group["fused"]
                 and kernels is None)
        state = self.state
        for name, p in zip(group_names(group, index), group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("LocalSgd does not support sparse gradients")
            terms = self._terms(name, p, coef, cache)
            if track:
                _before_path_step(state[p], p)
            if coef == 0:
                terms = None
            if kernels is not None and terms is not None:
                lp, lg = local(p), local(grad)
                buf = state[p].get("momentum_buffer") if momentum != 0 else None
                if terms.fit_kernels(lp, lg, *(() if buf is None else (local(buf),))):
                    kernel_items.append((p, lp, lg, buf, terms))
                    continue
            if terms is None or proximal:
                plain_p.append(p)
                plain_g.append(grad)
                plain_buf.append(state[p].get("momentum_buffer"))
            if terms is not None:
                reg_p.append(p)
                reg_terms.append(terms)
                reg_names.append(name)

        if plain_p:  # torch's own SGD update, unchanged
            _torch_sgd(plain_p, plain_g, plain_buf, weight_decay=group["weight_decay"],
                       momentum=momentum, lr=lr, dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=group["maximize"],
                       has_sparse_grad=False, foreach=group["foreach"],
                       fused=group["fused"] or None)
            if momentum != 0:
                for p, buf in zip(plain_p, plain_buf):
                    self.state[p]["momentum_buffer"] = buf

        if kernel_items:
            self._kernel_step(kernels, group, kernel_items, lr, coef)
        self._plans.pop(index, None)
        if (kernel_items and not track and not reg_p
                and len(kernel_items) + len(plain_p) == len(group["params"])
                and not any(is_sharded(p) for p in group["params"])):
            by_id = {id(p): t for p, _, _, _, t in kernel_items}
            items = []
            for p, name in zip(group["params"], group_names(group, index)):
                t = by_id.get(id(p))
                if t is None:  # no entry: torch's SGD step, with its momentum buffer
                    items.append((p, name, None, None, state[p],
                                  state[p].get("momentum_buffer") if momentum != 0 else None))
                else:
                    items.append((p, name, self._reg_params[name], t, state[p], None))
            self._plans[index] = _GroupPlan(group, coef, items)
        if reg_p and proximal:
            for p, terms in zip(reg_p, reg_terms):
                _proximal_(local(p), local(terms.omega), local(terms.init), lr * coef)
        elif reg_p:
            multi_tensor = self._penalised_sgd(group, reg_p, reg_terms, lr)
            if (multi_tensor and not track and not kernel_items
                    and not any(is_sharded(p) for p in group["params"])):
                self._plans[index] = ForeachPlan.build(
                    group["params"], group_names(group, index),
                    _foreach_switches(self, group, coef),
                    [(p, n, self._reg_params[n]) for p, n in zip(reg_p, reg_names)],
                    penalty_lists(reg_terms), self.state.get, momentum != 0, plain_p)

        if track:
            for p in group["params"]:
                if p.grad is not None:
                    _after_path_step(self.state[p], p)

    def _planned_kernel_step(self, kernels: _kernels.Kernels, group: dict, index: int,
                             lr: float, coef: float) -> bool:
        """The kernel step of a group whose every parameter the last step gave to the kernel,
        or, having no entry, to torch's SGD step (a new task's head), re-checking only what can
        change between steps: the same parameters, reg_params entries (still none for the
        others), Ω and θ* (tensor and version), memory, momentum buffers, and a contiguous
        gradient of its own. Anything else: False, nothing done, and the full step runs."""
        plan = self._plans.get(index)
        params = group["params"]
        if not isinstance(plan, _GroupPlan) or plan.params is not params \
                or len(params) != len(plan.items) or plan.coef != coef or plan.dtype is None:
            return False
        reg, momentum, states = self._reg_params, group["momentum"], self.state
        flags = _kernel_flags(group)
        rows, plain = [], []
        for q, (p, name, entry, t, state, plain_buf) in zip(params, plan.items):
            grad = p.grad
            if q is not p or reg.get(name) is not entry or states.get(p) is not state:
                return False
            if entry is None:
                if grad is None or grad.is_sparse or (
                        momentum != 0 and state.get("momentum_buffer") is not plain_buf):
                    return False
                plain.append((p, grad, plain_buf))
                continue
            if grad is None:
                continue
            omega, init = entry["omega"], entry["init_val"]
            ptrs = t.kernel_ptrs
            if (omega is not t.omega or init is not t.init or grad.is_sparse
                    or omega._version != t.key[2] or init._version != t.key[3]
                    or p.data_ptr() != ptrs[0] or omega.data_ptr() != ptrs[1]
                    or init.data_ptr() != ptrs[2] or p.shape != t.key[4]
                    or not grad.is_contiguous()):
                return False
            gp, bp = grad.data_ptr(), 0
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None or buf is not t.kernel_state():
                    return False
                bp = buf.data_ptr()
                if gp == bp:
                    return False
            if gp in ptrs:
                return False
            rows.append((ptrs[0], gp, bp, ptrs[1], ptrs[2], p.numel(), flags))
        if plain:  # torch's own SGD update, as in the full step
            ps, gs, bs = (list(xs) for xs in zip(*plain))
            _torch_sgd(ps, gs, bs, weight_decay=group["weight_decay"], momentum=momentum, lr=lr,
                       dampening=group["dampening"], nesterov=group["nesterov"],
                       maximize=group["maximize"], has_sparse_grad=False,
                       foreach=group["foreach"], fused=group["fused"] or None)
        if rows:
            kernels.sgd(plan.dtype, list(zip(*rows)), _kernel_scalars(group, lr, coef))
        return True

    def _planned_foreach_step(self, group: dict, index: int, lr: float, coef: float) -> bool:
        """The multi-tensor step of a group that the last step gave wholly to that path, from
        the lists kept since (see :mod:`mas_optim._foreach`); False, nothing done, where
        anything they depend on changed."""
        plan = self._plans.get(index)
        if not isinstance(plan, ForeachPlan):
            return False
        planned = plan.grads(group["params"], _foreach_switches(self, group, coef),
                             self._reg_params, self.state)
        if planned is None:
            return False
        gs, plain_gs = planned
        if plain_gs:  # torch's own SGD update, as in the full step
            _torch_sgd(plan.plain_ps, plain_gs, list(plan.plain_bs),
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=lr,
                       dampening=group["dampening"], nesterov=group["nesterov"],
                       maximize=group["maximize"], has_sparse_grad=False,
                       foreach=group["foreach"], fused=group["fused"] or None)
        _multi_tensor_mas_sgd(plan.ps, gs, plan.bs, plan.penalty, lr=lr,
                              momentum=group["momentum"], dampening=group["dampening"],
                              weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                              maximize=group["maximize"])
        return True

    def _kernels(self, group: dict) -> Optional[_kernels.Kernels]:
        """The one-pass C kernels if this group takes them: ``fused`` not False, ``foreach``
        not True, parameters on the CPU, and a C compiler that built them."""
        if group["fused"] is False or group["foreach"]:
            return None
        params = group["params"]
        if not params or local(params[0]).device.type != "cpu":
            return None
        return _kernels.load()

    def _kernel_step(self, kernels: _kernels.Kernels, group: dict,
                     items: List[Tuple[Tensor, Tensor, Tensor, Optional[Tensor], "_Terms"]],
                     lr: float, coef: float) -> None:
        """LocalSgd's whole update in one pass per parameter (``csrc/mas_kernels.c``): θ, g,
        b, Ω and θ* are each read once, θ and b written once; no cached terms. ``items``:
        (θ, its local tensor, local g, b or None, terms)."""
        momentum, flags = group["momentum"], _kernel_flags(group)
        by_dtype: Dict[torch.dtype, List[Tuple[int, ...]]] = {}
        for p, lp, lg, buf, t in items:
            b_ptr, first = 0, 0
            if momentum != 0:
                if buf is None:  # b_1 = d_1, written by the kernel; created like the parameter
                    buf = self.state[p]["momentum_buffer"] = torch.empty_like(
                        p, memory_format=torch.contiguous_format)
                    first = _kernels.FIRST
                b_ptr = local(buf).data_ptr()
            ptrs = t.kernel_ptrs
            entry = (ptrs[0], lg.data_ptr(), b_ptr, ptrs[1], ptrs[2], lp.numel(), flags | first)
            entries = by_dtype.get(lp.dtype)
            if entries is None:
                by_dtype[lp.dtype] = [entry]
            else:
                entries.append(entry)
        scalars = _kernel_scalars(group, lr, coef)
        for dtype, entries in by_dtype.items():
            kernels.sgd(dtype, list(zip(*entries)), scalars)

    def _penalised_sgd(self, group: dict, params: List[Tensor], terms: List["_Terms"],
                       lr: float) -> bool:
        """The explicit penalised step of ``params``; True if the multi-tensor path stepped
        them all (the next step may then be planned, see :meth:`_planned_foreach_step`)."""
        momentum = group["momentum"]
        bufs: List[Optional[Tensor]] = [self.state[p].get("momentum_buffer") for p in params]
        hyper = dict(lr=lr, momentum=momentum, dampening=group["dampening"],
                     weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                     maximize=group["maximize"])
        if momentum != 0 and any(b is None for b in bufs):
            # First step of a parameter: b_1 = d_1, i.e. b_0 = 0 without dampening. Buffers are
            # created like the parameter (a DTensor for a sharded one), so state dicts see what
            # torch's SGD would save.
            fresh = [i for i, b in enumerate(bufs) if b is None]
            for i in fresh:
                bufs[i] = self.state[params[i]]["momentum_buffer"] = torch.zeros_like(params[i])
            _single_tensor_mas_sgd([params[i] for i in fresh], [bufs[i] for i in fresh],
                                   [terms[i] for i in fresh], **dict(hyper, dampening=0.0))
            kept = [i for i in range(len(params)) if i not in set(fresh)]
            params, bufs, terms = ([xs[i] for i in kept] for xs in (params, bufs, terms))
            if not params:
                return False
        if group["fused"]:
            if self._fused_kernel is None:
                self._fused_kernel = _compile_fused_kernel()
            if self._fused_kernel is not False:
                try:
                    _fused_mas_sgd(self._fused_kernel, self._fused_scalars, params, bufs, terms,
                                   **hyper)
                    return False
                except Exception as e:  # noqa: BLE001 - any compiler failure falls back
                    self._fused_kernel = False
                    c_kernel = (f"C kernel: {_kernels.reason()}; "
                                if local(params[0]).device.type == "cpu" else "")
                    warnings.warn(
                        f"LocalSgd(fused=True): no fused step could be built ({c_kernel}"
                        f"torch.compile: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200]}); using the unfused step",
                        RuntimeWarning, stacklevel=3)
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(local(p).device.type == "cuda" for p in params)
        if foreach:
            _multi_tensor_mas_sgd([local(p) for p in params], [local(p.grad) for p in params],
                                  [local(b) for b in bufs] if momentum != 0 else [],
                                  penalty_lists(terms), **hyper)
        else:
            _single_tensor_mas_sgd(params, bufs, terms, **hyper)
        return foreach

    # ------------------------------------------------------------------ logging and SI

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² over this optimizer's regularised parameters (Eq. 3), for logging."""
        return _penalty(self._reg_params, (
            (float(group["reg_lambda"]), name, p) for i, group in enumerate(self.param_groups)
            for name, p in zip(group_names(group, i), group["params"])))

    @torch.no_grad()
    def path_integral_omega(self, xi: float = 0.1) -> Dict[str, Tensor]:
        r"""Synaptic Intelligence importance, then reset the path integral.

        Returns, for every named parameter that has taken a tracked step,
        :math:`\Omega = w / ((\theta - \theta_{start})^2 + \xi)` (Zenke et al. 2017, Eq. 5),
        where :math:`w = -\sum_t g_t \odot \Delta\theta_t` and θ_start is the value when tracking
        began or was last reset. w is set to zero and θ_start to the current values, ready for
        the next task. Feed the result to :func:`consolidate_reg_params` like any Ω.

        Args:
            xi: the damping ξ > 0 that keeps Ω bounded where a parameter barely moved.
        """
        if not self.track_path_integral:
            raise RuntimeError("path_integral_omega needs LocalSgd(..., track_path_integral=True)")
        if not (isinstance(xi, (int, float)) and xi > 0):
            raise ValueError(f"Invalid xi value: {xi}")
        omega: Dict[str, Tensor] = {}
        for name, p in self._named_params():
            state = self.state.get(p, {})
            if "si_w" not in state:
                continue
            start = state["si_start"]
            omega[name] = state["si_w"] / ((p - start).square() + xi)
            state["si_w"].zero_()
            start.copy_(p)
        return omega


def _kernel_flags(group: Mapping[str, Any]) -> int:
    return ((_kernels.MOMENTUM if group["momentum"] != 0 else 0)
            | (_kernels.NESTEROV if group["nesterov"] else 0)
            | (_kernels.PROXIMAL if group["proximal"] else 0)
            | (_kernels.DECAY if group["weight_decay"] != 0 else 0))


def _kernel_scalars(group: Mapping[str, Any], lr: float, coef: float) -> Tuple[float, ...]:
    return (lr, group["momentum"], group["dampening"], group["weight_decay"], coef,
            -1.0 if group["maximize"] else 1.0)


class _GroupPlan:
    """A param group's parameters as the last step found them: (θ, name, entry, terms, optimizer
    state, momentum buffer of a parameter without entry), the regularised ones taken by the C
    kernel, the others (entry None) by torch's SGD step (see _planned_kernel_step)."""

    __slots__ = ("params", "coef", "items", "dtype")

    def __init__(self, group: Mapping[str, Any], coef: float, items: list) -> None:
        self.params, self.coef, self.items = group["params"], coef, items
        dtypes = {p.dtype for p, _, entry, *_ in items if entry is not None}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None


def _foreach_switches(opt: "LocalSgd", group: Mapping[str, Any], coef: float) -> tuple:
    """What chooses the multi-tensor path and its terms, besides the parameters."""
    return (coef, group["foreach"], group["fused"], group["proximal"], group["momentum"] != 0,
            opt.cache_penalty)


def _check_same_names(index: int, own: List[Optional[str]], saved: Optional[List[Any]]) -> None:
    if saved is None:  # a state dict of an optimizer built without names
        return
    for k, (mine, theirs) in enumerate(zip(own, saved)):
        if mine is None or theirs is None or _strip(mine) == _strip(str(theirs)):
            continue
        raise ValueError(
            f"loaded state dict names parameter {k} of param group {index} {theirs!r}, this "
            f"optimizer names it {mine!r}: the state dict belongs to other parameters (names "
            "may differ only by a leading 'module.' or '_orig_mod.')")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _penalty(reg_params: RegParams,
             params: Iterable[Tuple[float, Optional[str], Tensor]]) -> Tensor:
    """λ Σ Ω (θ − θ*)² (Eq. 3) over ``(λ, name, θ)``; parameters without an entry add nothing.
    A 0-dim tensor like the first parameter (zero if none is regularised). Sharded parameters
    give this rank's partial sums, so the total is then a collective (every rank calls it, as
    every rank steps)."""
    total, first = None, None
    for lam, name, p in params:
        first = p if first is None else first
        entry = reg_params.get(name) if name is not None else None
        if entry is None:
            continue
        if entry["omega"].shape != p.shape:
            check_entry(name, entry, p)
        term = (entry["omega"] * (p - entry["init_val"]).square()).sum() * lam
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=getattr(first, "device", None),
                           dtype=getattr(first, "dtype", None))
    return total.full_tensor() if is_sharded(total) else total


class _Terms:
    """Ω and θ* of one regularised parameter, and, when cached, (2λΩ, 2λΩθ*): the penalty
    gradient 2λΩ(θ − θ*) = slope·θ − offset then costs one fused multiply-add per pass."""

    __slots__ = ("key", "omega", "init", "coef", "slope", "offset", "kernel_ptrs", "_fits",
                 "_state", "_omega", "_init")

    def __init__(self, key: tuple, omega: Tensor, init: Tensor, coef: float,
                 cache: bool) -> None:
        self.key, self.omega, self.init, self.coef = key, omega, init, coef
        self.slope = self.offset = None
        if cache:
            self.slope = local(omega).mul(coef)
            self.offset = self.slope.mul(local(init))
        self.kernel_ptrs: Tuple[int, ...] = ()  # addresses of θ, Ω, θ* when last checked
        self._fits = False
        self._state: Tuple[Tensor, ...] = ()
        self._omega, self._init = local(omega), local(init)  # this rank's shards

    def kernel_state(self) -> Optional[Tensor]:
        """The first optimizer state tensor :meth:`fit_kernels` last accepted (or None)."""
        return self._state[0] if self._state else None

    def fit_kernels(self, p: Tensor, g: Tensor, *state: Tensor) -> bool:
        """Whether the C kernels can update local tensors ``p`` (θ), ``g`` and the optimizer's
        ``state`` tensors (a momentum buffer, Adam's moments) with this Ω and θ* (see
        :func:`_kernels.fits`). The full check runs when a tensor's memory moved (``.data``
        reassigned, new state); each step checks the addresses and ``g``."""
        ptrs = (p.data_ptr(), self._omega.data_ptr(), self._init.data_ptr())
        if ptrs != self.kernel_ptrs:
            self.kernel_ptrs, self._state = ptrs, ()
            self._fits = _kernels.fits(p, self._omega, self._init)
        if not self._fits:
            return False
        known = self._state
        same = len(state) == len(known)
        if same:
            for a, b in zip(state, known):
                if a is not b:
                    same = False
                    break
        if not same:
            if not _kernels.fits(p, self._omega, self._init, *state):
                return False
            self._state = state
        if not g.is_contiguous():
            return False
        gp = g.data_ptr()
        if gp in ptrs:
            return False
        for s in state:
            if gp == s.data_ptr():
                return False
        return True


# ---------------------------------------------------------------------- functional core
# Every function below works on plain local tensors: for a sharded (DTensor) parameter, its
# gradient, buffer, Ω and θ* are this rank's shards (the update is elementwise).

def _slices(*tensors: Tensor) -> Iterable[Tuple[Tensor, ...]]:
    """Matching cache-sized slices of same-shaped tensors (the whole tensors if they are small,
    can't be viewed flat, or are not on the CPU, where slicing buys nothing)."""
    first = tensors[0]
    if (first.numel() <= _SLICE_ABOVE or first.device.type != "cpu"
            or not all(t.is_contiguous() for t in tensors)):
        return (tensors,)
    return zip(*(t.view(-1).split(_CHUNK) for t in tensors))


def _single_tensor_mas_sgd(params: List[Tensor], bufs: List[Optional[Tensor]],
                           terms: List[_Terms], **hyper: Any) -> None:
    for p, b, t in zip(params, bufs, terms):
        _mas_sgd_(local(p), local(p.grad), None if b is None else local(b), t, **hyper)


def _mas_sgd_(
    p: Tensor, grad: Tensor, buf: Optional[Tensor], terms: _Terms, *, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    """One SGD step on θ with d = ±g + wd·θ + 2λΩ(θ − θ*) (the gradient of Eq. 3's penalty).

    ``buf`` is the momentum buffer (given whenever momentum ≠ 0). Large tensors are done slice
    by slice, so that θ and the buffer stay in cache between the passes.
    """
    cached = terms.slope is not None
    a, c = (terms.slope, terms.offset) if cached else (local(terms.omega), local(terms.init))
    if momentum != 0 and weight_decay == 0 and not nesterov and not maximize and dampening == 0:
        for p_, g_, a_, c_, b_ in _slices(p, grad, a, c, buf):  # the common case
            torch.add(g_, b_, alpha=momentum, out=b_)      # b = μb + g
            if cached:
                b_.addcmul_(a_, p_).sub_(c_)               #   + 2λΩ(θ − θ*)   (Eq. 3)
            else:
                b_.addcmul_(a_, torch.sub(p_, c_), value=terms.coef)
            p_.add_(b_, alpha=-lr)
        return

    for p_, g_, a_, c_, b_ in _slices(p, grad, a, c, buf if buf is not None else p):
        if cached:
            d = torch.mul(a_, p_).sub_(c_)                 # 2λΩ(θ − θ*)       (Eq. 3)
        else:
            d = torch.sub(p_, c_).mul_(a_).mul_(terms.coef)
        d.add_(g_, alpha=-1.0 if maximize else 1.0)
        if weight_decay != 0:
            d.add_(p_, alpha=weight_decay)
        if momentum != 0:
            b_.mul_(momentum).add_(d, alpha=1.0 - dampening)
            if nesterov:
                d.add_(b_, alpha=momentum)
            else:
                d = b_
        p_.add_(d, alpha=-lr)


def _multi_tensor_mas_sgd(
    ps: List[Tensor], gs: List[Tensor], bs: List[Tensor], penalty: ForeachPenalty, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    maximize: bool,
) -> None:
    """The same update with torch's multi-tensor kernels: one launch per pass for all
    parameters of the group (what torch's SGD does with ``foreach=True``). ``bs``: the
    momentum buffers (empty without momentum); ``penalty``: see :func:`penalty_lists`."""
    if momentum != 0 and not nesterov:
        # b = μb + (1 − τ)(±g + wd·θ + 2λΩ(θ − θ*)), accumulated into b term by term, so the
        # gradients are neither copied nor changed.
        scale = 1.0 - dampening
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, gs, alpha=-scale if maximize else scale)
        if weight_decay != 0:
            torch._foreach_add_(bs, ps, alpha=scale * weight_decay)
        add_penalty_(bs, ps, penalty, scale)
        torch._foreach_add_(ps, bs, alpha=-lr)
        return
    d = torch._foreach_neg(gs) if maximize else torch._foreach_mul(gs, 1.0)
    add_penalty_(d, ps, penalty, 1.0)
    if weight_decay != 0:
        torch._foreach_add_(d, ps, alpha=weight_decay)
    if momentum != 0:  # with nesterov: the other momentum cases returned above
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, d, alpha=1.0 - dampening)
        torch._foreach_add_(d, bs, alpha=momentum)
    torch._foreach_add_(ps, d, alpha=-lr)


def _fused_kernel_body(ps: List[Tensor], gs: List[Tensor], bs: List[Tensor],
                       omegas: List[Tensor], inits: List[Tensor], lr: Tensor, momentum: Tensor,
                       dampening: Tensor, weight_decay: Tensor, coef: Tensor, use_momentum: bool,
                       nesterov: bool, maximize: bool) -> None:
    # Compiled, the chain below is fused along each tensor (θ, g, b, Ω, θ* read once, θ and b
    # written once) and across tensors (few kernel launches): on a GPU, written one tensor at a
    # time it launched twice the host time (benchmarks/bench_cuda.py --variants). The
    # hyperparameters are 0-dim tensors so that a learning-rate schedule does not recompile.
    d = torch._foreach_sub(ps, inits)
    torch._foreach_mul_(d, omegas)
    torch._foreach_mul_(d, coef)                       # 2λΩ(θ − θ*)   (Eq. 3)
    if maximize:
        torch._foreach_sub_(d, gs)
    else:
        torch._foreach_add_(d, gs)
    torch._foreach_add_(d, torch._foreach_mul(ps, weight_decay))
    if use_momentum:
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, torch._foreach_mul(d, 1 - dampening))
        if nesterov:
            torch._foreach_add_(d, torch._foreach_mul(bs, momentum))
        else:
            d = bs
    torch._foreach_add_(ps, torch._foreach_mul(d, -lr))


def _compile_fused_kernel() -> Callable:
    return torch.compile(_fused_kernel_body, fullgraph=True)


def _fused_mas_sgd(kernel: Callable, scalars: DeviceScalars, params: List[Tensor],
                   bufs: List[Optional[Tensor]], terms: List[_Terms], *, lr: float,
                   momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                   maximize: bool) -> None:
    ps = [local(p) for p in params]
    kernel(ps, [local(p.grad) for p in params],
           [local(b) for b in bufs] if momentum != 0 else ps,  # type: ignore[arg-type]
           [local(t.omega) for t in terms], [local(t.init) for t in terms],
           *scalars.get((lr, momentum, dampening, weight_decay, terms[0].coef), ps[0]),
           momentum != 0, nesterov, maximize)


def _proximal_(p: Tensor, omega: Tensor, init_val: Tensor, lr_coef: float) -> None:
    """θ ← θ* + (θ − θ*) / (1 + lr_coef·Ω): the proximal map of (lr_coef/2)·ΣΩ(θ − θ*)²."""
    for p_, o_, a_ in _slices(p, omega, init_val):
        d = torch.sub(p_, a_)
        d.div_(torch.mul(o_, lr_coef).add_(1.0))
        torch.add(a_, d, out=p_)


def _before_path_step(state: dict, p: Tensor) -> None:
    if "si_w" not in state:
        state["si_w"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["si_start"] = p.detach().clone(memory_format=torch.contiguous_format)
        state["si_prev"] = torch.empty_like(state["si_start"])
    state["si_prev"].copy_(p)


def _after_path_step(state: dict, p: Tensor) -> None:
    # Zenke et al. Eq. 3: w −= g ⊙ Δθ, with g the task gradient (p.grad: the penalty and weight
    # decay are never written into it).
    prev = state["si_prev"]
    prev.sub_(p)                                  # −Δθ
    state["si_w"].addcmul_(p.grad, prev)
