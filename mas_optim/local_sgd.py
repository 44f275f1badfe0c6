r"""LocalSgd: SGD that adds the MAS penalty gradient inside ``step()``.

The MAS objective for a new task is (paper Eq. 3)

.. math::
    L(\theta) = L_{task}(\theta) + \lambda \sum_i \Omega_i (\theta_i - \theta^*_i)^2 ,

so the penalty's gradient is :math:`2\lambda\Omega(\theta - \theta^*)`. It is cheap and local to
each parameter, so, as in the original ``optimizer_lib``, it is added in the optimizer instead of
through autograd: the training graph stays as small as plain SGD's. The update itself is
:func:`mas_optim.functional.mas_sgd`.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional as F
from ._state import take_entries, with_entries
from ._validate import CheckedEntries, as_reg_lambda, check_reg_params, group_names
from .reg_params import RegParams

_MAS_KEYS = ("reg_lambda", "proximal")
_NAME_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / DataParallel and torch.compile


class LocalSgd(torch.optim.SGD):
    r"""Drop-in :class:`torch.optim.SGD` with the MAS penalty gradient added in ``step()``.

    Each step is :func:`mas_optim.functional.mas_sgd` per param group: for a parameter with an
    entry (Ω, θ*) in ``reg_params``, exactly ``torch.optim.SGD`` on the loss plus λΣΩ(θ − θ*)²
    (``maximize`` negates only the task gradient); every other parameter (no entry, or no name:
    appended by a dynamic-model loop such as Avalanche's) gets torch's own SGD update. ``.grad``
    is never written: after a step it holds the task gradient, on every implementation.
    ``proximal=True``: torch's SGD on the task gradient, then the exact proximal map
    θ ← θ* + (θ − θ*) / (1 + 2γλΩ), stable for any λ; the explicit step diverges once
    2γλ max Ω > 2, and LocalSgd then warns once. ``track_path_integral=True`` also accumulates
    Synaptic Intelligence's path integral (:meth:`path_integral_omega`). Ω, θ* and λ travel in
    :meth:`state_dict`, so a framework's checkpoint of the optimizer restores the penalty.

    Args:
        params: ``model.named_parameters()``, or param groups whose ``"params"`` are
            ``(name, tensor)`` pairs; the names key into ``reg_params``. Parameters without names
            are accepted and get torch's SGD update (they have no reg_params entry).
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}`` from :func:`init_reg_params`,
            :func:`consolidate_reg_params` or :func:`load_reg_params`. ``None``: no penalty.
        reg_lambda: λ of Eq. 3 (the paper's; Avalanche's ``lambda_reg`` is 2λ). Per group. Any
            real scalar ≥ 0 (Python, numpy, a 0-dim tensor); a string is refused.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        foreach, fused: the implementation, as torch's SGD takes them (``None``: the device's
            default); :meth:`implementation` says which runs and why. ``differentiable=True``
            is refused.
        proximal: apply the penalty by its proximal map instead of its gradient.
        track_path_integral: accumulate the SI path integral for :meth:`path_integral_omega`.
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
        self._entries = CheckedEntries()
        self._warned_unstable = False
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
        return dict(super().__getstate__(), _reg_params=self._reg_params,
                    _mas_defaults=self._mas_defaults, track_path_integral=self.track_path_integral)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Fill what an older pickle (or load_state_dict's partial state) lacks.
        defaults = {"reg_lambda": 0.01, "proximal": False, **self.defaults}
        self.__dict__.setdefault("_mas_defaults", {k: defaults[k] for k in _MAS_KEYS})
        self.__dict__.setdefault("_reg_params", {})
        self.__dict__.setdefault("track_path_integral", False)
        self._entries = CheckedEntries()
        self._warned_unstable = False
        for group in self.param_groups:
            for key in _MAS_KEYS:
                group.setdefault(key, self._mas_defaults[key])

    def state_dict(self) -> Dict[str, Any]:
        """As torch's, plus Ω and θ* of each regularised parameter in its state
        (``"mas_omega"``, ``"mas_init_val"``); λ is in each group (``"reg_lambda"``)."""
        return with_entries(super().state_dict(), self.param_groups, group_names,
                            self._reg_params, [g["reg_lambda"] for g in self.param_groups])

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's, restoring the penalty: Ω and θ* (replacing :attr:`reg_params`), λ and
        ``proximal`` per group. The optimizer keeps its own parameter names; saved ones may
        differ only by a leading ``module.`` or ``_orig_mod.`` (else a ValueError naming the
        parameter). A state dict without Ω/θ* (``torch.optim.SGD``'s) keeps this optimizer's
        reg_params, with one warning, and its groups' λ and ``proximal`` where it has none."""
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
        state_dict, found = take_entries(state_dict, self.param_groups, group_names)
        super().load_state_dict(state_dict)
        if found is not None:
            self.reg_params = found
        elif self._reg_params:  # with none on either side there is nothing to keep or lose
            warnings.warn(f"LocalSgd.load_state_dict: the state dict carries no Ω/θ* (saved "
                          f"without the MAS penalty); keeping this optimizer's reg_params "
                          f"({len(self._reg_params)} entries)", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ reg_params

    @property
    def reg_params(self) -> RegParams:
        """``{name: {"omega", "init_val"}}``, checked on assignment and when it changes."""
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

    def implementation(self) -> List[Tuple[str, str]]:
        """Per param group, the implementation its step takes and why (see
        :func:`mas_optim.functional.implementation`)."""
        return [F.implementation(g["params"], foreach=g["foreach"], fused=g["fused"])
                for g in self.param_groups]

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimization step. ``closure``: a callable that re-evaluates the model and
        returns the loss, or a reg_params dict (``step(reg_params)``, as the original code
        calls it), which then replaces :attr:`reg_params`."""
        if isinstance(closure, Mapping):
            self.reg_params, closure = closure, None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            self._step_group(group, i)
        self._entries.keep_only(p for group in self.param_groups for p in group["params"])
        return loss

    def _step_group(self, group: dict, index: int) -> None:
        lam = as_reg_lambda(group["reg_lambda"])
        lr = float(group["lr"])
        params, grads, bufs, omegas, inits = [], [], [], [], []
        top = 0.0
        for name, p in zip(group_names(group, index), group["params"]):
            if p.grad is None:
                continue
            found = self._entries.get(self._reg_params, name, p)
            omega, init, peak = found if found is not None else (None, None, 0.0)
            params.append(p)
            grads.append(p.grad)
            bufs.append(self.state[p].get("momentum_buffer"))
            omegas.append(omega)
            inits.append(init)
            top = max(top, peak)
        if not params:
            return
        if not group["proximal"] and 2 * lr * lam * top > 2 and not self._warned_unstable:
            self._warned_unstable = True
            warnings.warn(f"LocalSgd: 2·lr·λ·max Ω = {2 * lr * lam * top:.3g} > 2, where the "
                          "explicit penalty step diverges (NaN weights); use LocalSgd(..., "
                          "proximal=True), stable for any λ", RuntimeWarning, stacklevel=5)
        for p in params if self.track_path_integral else ():
            _before_path_step(self.state[p], p)
        F.mas_sgd(params, grads, bufs, omegas, inits, reg_lambda=lam, lr=lr,
                  momentum=group["momentum"], dampening=group["dampening"],
                  weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                  maximize=group["maximize"], proximal=group["proximal"],
                  foreach=group["foreach"], fused=group["fused"])
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
        for p in params if self.track_path_integral else ():
            _after_path_step(self.state[p], p)

    # ------------------------------------------------------------------ logging and SI

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² over this optimizer's regularised parameters (Eq. 3), for logging."""
        found = ((g["reg_lambda"], p, self._entries.get(self._reg_params, n, p))
                 for i, g in enumerate(self.param_groups)
                 for n, p in zip(group_names(g, i), g["params"]))
        total = F.penalty((lam, p, e[0], e[1]) for lam, p, e in found if e is not None)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        return total if first is None else total.to(device=first.device, dtype=first.dtype)

    @torch.no_grad()
    def path_integral_omega(self, xi: float = 0.1) -> Dict[str, Tensor]:
        r"""Synaptic Intelligence importance, then reset the path integral.

        For every named parameter that has taken a tracked step,
        :math:`\Omega = w / ((\theta - \theta_{start})^2 + \xi)` (Zenke et al. 2017, Eq. 5),
        :math:`w = -\sum_t g_t \odot \Delta\theta_t` (g: the task gradient), θ_start the value
        when tracking began or was last reset; then w = 0 and θ_start = θ, ready for the next
        task. Feed it to :func:`consolidate_reg_params` like any Ω. ``xi``: the damping ξ > 0.
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


