r"""LocalSgd: SGD that adds the MAS penalty gradient inside ``step()``.

The MAS objective for a new task is (paper Eq. 3)

.. math::
    L(\theta) = L_{task}(\theta) + \lambda \sum_i \Omega_i (\theta_i - \theta^*_i)^2 ,

so the penalty's gradient is :math:`2\lambda\Omega(\theta - \theta^*)`. It is cheap and local to
each parameter, so, as in the original ``optimizer_lib``, it is added in the optimizer instead of
through autograd: the training graph stays as small as plain SGD's.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd

from .reg_params import RegParams

# On the CPU, regularised parameters of more than _SLICE_ABOVE elements are updated in slices of
# _CHUNK elements, so that every pass of the update after the first reads θ and the momentum
# buffer from cache. Smaller ones already fit in the last-level cache: slicing only adds calls.
_CHUNK = 1 << 18
_SLICE_ABOVE = 1 << 20


class LocalSgd(torch.optim.SGD):
    r"""Drop-in :class:`torch.optim.SGD` with the MAS penalty gradient added in ``step()``.

    For a parameter θ with an entry in ``reg_params`` (Ω, θ*) each step computes

    .. math::
        d_t &= \pm\nabla L_{task}(\theta_{t-1}) + wd\,\theta_{t-1}
               + 2\lambda\,\Omega\odot(\theta_{t-1} - \theta^*)   &&\text{(gradient of Eq. 3)} \\
        b_t &= \mu b_{t-1} + (1 - \tau) d_t \quad (b_1 = d_1)      &&\text{(if } \mu \ne 0) \\
        \theta_t &= \theta_{t-1} - \gamma\,(d_t + \mu b_t \text{ if nesterov else } b_t)

    which is exactly ``torch.optim.SGD`` on the loss plus the penalty. ``maximize`` negates only
    the task gradient: the penalty always pulls θ back toward θ*. Parameters without an entry
    (a task head, say) get torch's own SGD update.

    With ``proximal=True`` the step is torch's SGD on the task gradient alone, followed by the
    exact proximal map of γλΣΩ(θ−θ*)²:  θ ← θ* + (θ − θ*) / (1 + 2γλΩ). The explicit step
    diverges once 2γλΩ > 2; the proximal step is stable for any λ and agrees with the explicit
    one as γλΩ → 0.

    With ``track_path_integral=True`` it also accumulates Synaptic Intelligence's path integral
    w ← w − g ⊙ Δθ at every step (g: the task gradient, Δθ: the change the step made); see
    :meth:`path_integral_omega`.

    Args:
        params: named parameters, as ``model.named_parameters()`` yields them, or param groups
            whose ``"params"`` are ``(name, tensor)`` pairs. The names key into ``reg_params``.
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}`` from :func:`init_reg_params`,
            :func:`consolidate_reg_params` or :func:`load_reg_params`. ``None``: no penalty.
        reg_lambda: λ of Eq. 3 (the paper's; Avalanche's ``lambda_reg`` is 2λ). Per group.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
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
        proximal: bool = False,
        track_path_integral: bool = False,
    ) -> None:
        _check_reg_lambda(reg_lambda)
        self._mas_defaults = {"reg_lambda": float(reg_lambda), "proximal": bool(proximal)}
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.defaults.update(self._mas_defaults)
        self.track_path_integral = bool(track_path_integral)
        self._penalty_cache: Dict[Tensor, tuple] = {}
        self._reg_params: RegParams = {}
        self.reg_params = reg_params if reg_params is not None else {}

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, and each group must be named; it may set its own ``reg_lambda``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "param_names" not in group:
            self.param_groups.pop()
            raise ValueError(
                "LocalSgd needs parameter names to find each parameter's reg_params: pass "
                "model.named_parameters() (or param groups of (name, parameter) pairs)")
        for key, value in self._mas_defaults.items():
            group.setdefault(key, value)
        _check_reg_lambda(group["reg_lambda"])

    def __setstate__(self, state: dict) -> None:
        # load_state_dict() of a plain SGD state dict: its groups have no reg_lambda/proximal.
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("reg_lambda", "proximal"):
                group.setdefault(key, self.defaults[key])

    # ------------------------------------------------------------------ reg_params

    @property
    def reg_params(self) -> RegParams:
        """The ``{name: {"omega", "init_val"}}`` dict the penalty uses (checked on assignment)."""
        return self._reg_params

    @reg_params.setter
    def reg_params(self, reg_params: Mapping[str, Mapping[str, Tensor]]) -> None:
        if not isinstance(reg_params, Mapping):
            raise TypeError(f"reg_params must be a dict keyed by parameter name, got "
                            f"{type(reg_params).__name__}")
        named = dict(self._named_params())
        for name, entry in reg_params.items():
            if not isinstance(name, str):
                raise TypeError("reg_params must be keyed by parameter name (str), got a key of "
                                f"type {type(name).__name__}")
            if name not in named:
                continue  # regularised elsewhere; this optimizer does not own it
            p = named[name]
            for key in ("omega", "init_val"):
                t = entry.get(key) if isinstance(entry, Mapping) else None
                if not isinstance(t, Tensor):
                    raise TypeError(f"reg_params[{name!r}][{key!r}] must be a tensor")
                if t.shape != p.shape or t.device != p.device or t.dtype != p.dtype:
                    raise ValueError(
                        f"reg_params[{name!r}][{key!r}] is {tuple(t.shape)} {t.dtype} on "
                        f"{t.device}, the parameter is {tuple(p.shape)} {p.dtype} on {p.device} "
                        "(load_reg_params(path, model) moves them to the model's device)")
        if reg_params and not any(name in named for name in reg_params):
            raise ValueError(
                "no name in reg_params matches a parameter of this optimizer: e.g. "
                f"{next(iter(reg_params))!r} vs {next(iter(named), None)!r}. Build reg_params "
                "from the same module whose named_parameters() you pass here")
        self._reg_params = reg_params  # type: ignore[assignment]

    def _named_params(self) -> Iterator[Tuple[str, Tensor]]:
        for group in self.param_groups:
            yield from zip(group["param_names"], group["params"])

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

        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, Tensor) else lr
        momentum, coef = group["momentum"], 2.0 * group["reg_lambda"]
        proximal, track = group["proximal"], self.track_path_integral
        plain_p, plain_g, plain_buf = [], [], []
        regularised = []
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LocalSgd does not support sparse gradients")
            state = self.state[p]
            if track:
                _before_path_step(state, p)
            entry = self._reg_params.get(name) if coef != 0 else None
            if entry is None or proximal:
                plain_p.append(p)
                plain_g.append(p.grad)
                plain_buf.append(state.get("momentum_buffer"))
            if entry is not None:
                regularised.append((p, state, entry))

        if plain_p:  # torch's own SGD update, unchanged
            _torch_sgd(plain_p, plain_g, plain_buf, weight_decay=group["weight_decay"],
                       momentum=momentum, lr=lr, dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=group["maximize"],
                       has_sparse_grad=False, foreach=None, fused=None)
            if momentum != 0:
                for p, buf in zip(plain_p, plain_buf):
                    self.state[p]["momentum_buffer"] = buf

        for p, state, entry in regularised:
            if proximal:
                _proximal_(p, entry["omega"], entry["init_val"], lr * coef)
                continue
            slope, offset = self._linear_penalty(p, entry, coef)
            buf = _mas_sgd_(
                p, p.grad, state.get("momentum_buffer"), slope, offset, lr=lr,
                momentum=momentum, dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                maximize=group["maximize"])
            if buf is not None:
                state["momentum_buffer"] = buf

        if track:
            for p in group["params"]:
                if p.grad is not None:
                    _after_path_step(self.state[p], p)

    def _linear_penalty(self, p: Tensor, entry: Mapping[str, Tensor],
                        coef: float) -> Tuple[Tensor, Tensor]:
        """(2λΩ, 2λΩθ*), so that the penalty gradient 2λΩ(θ − θ*) = slope·θ − offset costs one
        fused multiply-add in the hot loop. Recomputed only when Ω, θ* or λ change (in-place
        changes bump a tensor's version counter)."""
        omega, anchor = entry["omega"], entry["init_val"]
        key = (coef, omega._version, anchor._version)
        cached = self._penalty_cache.get(p)
        # The identity checks catch a replaced tensor (a new one may start at the same version).
        if cached is None or cached[0] != key or cached[3] is not omega or cached[4] is not anchor:
            slope = omega.mul(coef)
            cached = (key, slope, slope.mul(anchor), omega, anchor)
            self._penalty_cache[p] = cached
        return cached[1], cached[2]

    # ------------------------------------------------------------------ logging and SI

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² over this optimizer's regularised parameters (Eq. 3), for logging."""
        total = None
        for group in self.param_groups:
            lam = group["reg_lambda"]
            for name, p in zip(group["param_names"], group["params"]):
                entry = self._reg_params.get(name)
                if entry is None:
                    continue
                term = (entry["omega"] * (p - entry["init_val"]).square()).sum() * lam
                total = term if total is None else total + term
        if total is None:
            first = next(iter(self._named_params()), (None, torch.zeros(())))[1]
            return torch.zeros((), device=first.device, dtype=first.dtype)
        return total

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


def _check_reg_lambda(reg_lambda) -> None:
    if not (isinstance(reg_lambda, (int, float)) and not isinstance(reg_lambda, bool)
            and math.isfinite(reg_lambda) and reg_lambda >= 0):
        raise ValueError(f"Invalid reg_lambda value: {reg_lambda}")


# ---------------------------------------------------------------------- functional core

def _slices(*tensors: Tensor) -> Iterable[Tuple[Tensor, ...]]:
    """Matching cache-sized slices of same-shaped tensors (the whole tensors if they are small,
    can't be viewed flat, or are not on the CPU, where slicing buys nothing)."""
    first = tensors[0]
    if (first.numel() <= _SLICE_ABOVE or first.device.type != "cpu"
            or not all(t.is_contiguous() for t in tensors)):
        return (tensors,)
    return zip(*(t.view(-1).split(_CHUNK) for t in tensors))


def _mas_sgd_(
    p: Tensor, grad: Tensor, buf: Optional[Tensor], slope: Tensor, offset: Tensor, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    maximize: bool,
) -> Optional[Tensor]:
    """One SGD step on θ with d = ±g + wd·θ + (slope·θ − offset); returns the momentum buffer.

    slope·θ − offset = 2λΩ(θ − θ*), the gradient of Eq. 3's penalty. Large tensors are done
    slice by slice, so that θ and the buffer stay in cache between the passes.
    """
    if momentum != 0 and buf is None and dampening == 0:
        buf = torch.zeros_like(p, memory_format=torch.contiguous_format)  # then b_1 = d_1
    if (momentum != 0 and dampening == 0 and weight_decay == 0 and not nesterov
            and not maximize):  # the common case: 4 passes, no temporary
        for p_, g_, s_, o_, b_ in _slices(p, grad, slope, offset, buf):
            torch.add(g_, b_, alpha=momentum, out=b_)      # b = μb + g
            b_.addcmul_(s_, p_).sub_(o_)                   #   + 2λΩ(θ − θ*)   (Eq. 3)
            p_.add_(b_, alpha=-lr)
        return buf

    new_buf = buf
    if momentum != 0 and buf is None:
        new_buf = torch.empty_like(p, memory_format=torch.contiguous_format)
    for p_, g_, s_, o_, b_ in _slices(p, grad, slope, offset,
                                      new_buf if new_buf is not None else p):
        d = torch.mul(s_, p_).sub_(o_)                     # 2λΩ(θ − θ*)       (Eq. 3)
        d.add_(g_, alpha=-1.0 if maximize else 1.0)
        if weight_decay != 0:
            d.add_(p_, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                b_.copy_(d)
            else:
                b_.mul_(momentum).add_(d, alpha=1.0 - dampening)
            if nesterov:
                d.add_(b_, alpha=momentum)
            else:
                d = b_
        p_.add_(d, alpha=-lr)
    return new_buf


def _proximal_(p: Tensor, omega: Tensor, anchor: Tensor, lr_coef: float) -> None:
    """θ ← θ* + (θ − θ*) / (1 + lr_coef·Ω): the proximal map of (lr_coef/2)·ΣΩ(θ − θ*)²."""
    for p_, o_, a_ in _slices(p, omega, anchor):
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
