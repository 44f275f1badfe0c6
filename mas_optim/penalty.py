r"""The MAS penalty for any torch optimizer (Adam, AdamW, RMSprop, SGD, ...).

:func:`add_mas_penalty` registers a step pre-hook that adds the gradient of paper Eq. 3's
penalty to each regularised parameter's ``.grad`` just before the optimizer's own step
(:func:`mas_optim.functional.add_penalty_`):

.. math::
    g \leftarrow g + 2\lambda\,\Omega\odot(\theta - \theta^*) ,

so any optimizer then steps on the gradient of :math:`L_{task} + \lambda\sum\Omega(\theta -
\theta^*)^2` without the penalty ever entering the autograd graph. The optimizer's own update,
state, options and fused/foreach kernels are torch's, untouched. Example::

    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.01)
    mas = mas_optim.add_mas_penalty(opt, reg_params, reg_lambda=1.0)
    ...  # the usual loop: zero_grad, loss.backward(), opt.step()
    mas.remove()  # plain AdamW again
"""

from __future__ import annotations

import warnings
from typing import List, Mapping, Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._state import pop_loaded_entries, take_entries, with_entries
from ._validate import (CheckedEntries, as_reg_lambda, check_reg_params, group_names,
                        unwrap_optimizer)
from .local_sgd import LocalSgd
from .reg_params import RegParams

__all__ = ["MasPenalty", "add_mas_penalty"]


class MasPenalty:
    """The MAS penalty attached to an optimizer by :func:`add_mas_penalty`.

    Attributes:
        optimizer: the torch optimizer it acts on (unwrapped from a framework's wrapper).
        reg_params: ``{name: {"omega", "init_val"}}``; assignment is checked like LocalSgd's.
        reg_lambda: λ of Eq. 3 for groups that do not set ``"reg_lambda"`` themselves.
    """

    def __init__(self, optimizer, reg_params: Optional[RegParams], reg_lambda: float, *,
                 model: Optional[nn.Module], proximal: bool, foreach: Optional[bool],
                 fused: Optional[bool]) -> None:
        optimizer = unwrap_optimizer(optimizer, "add_mas_penalty")
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
        self.proximal, self.foreach, self.fused = proximal, foreach, fused
        self.reg_lambda = as_reg_lambda(reg_lambda)
        self._by_id: dict = {}
        self._entries = CheckedEntries()
        self._reg_params: RegParams = {}
        loaded = pop_loaded_entries(optimizer, self._names)
        if loaded is not None and reg_params is not None:
            warnings.warn("add_mas_penalty: using the reg_params given; the Ω/θ* loaded into "
                          "the optimizer's state are dropped", UserWarning, stacklevel=3)
        elif reg_params is None:
            if loaded is None:
                warnings.warn("add_mas_penalty: no reg_params given and none loaded into the "
                              "optimizer's state: the penalty is off until reg_params are set",
                              UserWarning, stacklevel=3)
            reg_params = loaded
        self.reg_params = reg_params if reg_params is not None else {}
        self._handles = [
            optimizer.register_step_post_hook(self._after_step) if proximal
            else optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._load)]

    @property
    def reg_params(self) -> RegParams:
        return self._reg_params

    @reg_params.setter
    def reg_params(self, reg_params: RegParams) -> None:
        check_reg_params(reg_params, dict(self._named_params()))
        self._reg_params = reg_params

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

    def _groups(self, with_grad: bool = True):
        """Per param group: (group, λ, [(θ, Ω, θ*)] of its regularised parameters)."""
        for i, group in enumerate(self.optimizer.param_groups):
            lam = as_reg_lambda(group.get("reg_lambda", self.reg_lambda))
            terms = []
            for name, p in zip(self._names(group, i), group["params"]):
                if with_grad and p.grad is None:
                    continue
                found = self._entries.get(self._reg_params, name, p)
                if found is not None:
                    terms.append((p, found[0], found[1]))
            yield group, lam, terms

    def _save(self, optimizer, state_dict):
        return with_entries(state_dict, optimizer.param_groups, self._names, self._reg_params,
                            [g.get("reg_lambda", self.reg_lambda) for g in optimizer.param_groups])

    def _load(self, optimizer, state_dict):
        state_dict, found = take_entries(state_dict, optimizer.param_groups, self._names)
        if found is None and self._reg_params:  # with none on either side: nothing to keep
            warnings.warn("optimizer.load_state_dict: the state dict carries no Ω/θ* (saved "
                          "without the MAS penalty); keeping add_mas_penalty's reg_params "
                          f"({len(self._reg_params)} entries)", UserWarning, stacklevel=3)
        elif found is not None:
            self.reg_params = found
        return state_dict

    def _before_step(self, optimizer, args, kwargs):
        # args are step's own: (optimizer, [closure])
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._add_penalty()
            return None

        # step(closure) computes the gradient inside step, after this hook: the penalty goes
        # into the closure, and its value into the loss the optimizer sees (LBFGS's line
        # search compares losses).
        def closure_with_penalty():
            loss = closure()
            self._add_penalty()
            return loss if loss is None else loss + self.penalty().to(loss)

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_with_penalty)
        return (args[0], closure_with_penalty, *args[2:]), kwargs

    def _add_penalty(self) -> None:
        for group, lam, terms in self._groups():
            if terms and lam != 0:
                ps, omegas, inits = (list(xs) for xs in zip(*terms))
                F.add_penalty_([p.grad for p in ps], ps, omegas, inits, reg_lambda=lam,
                               maximize=bool(group.get("maximize", False)),
                               foreach=self.foreach, fused=self.fused)

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, lam, terms in self._groups():
            if terms and lam != 0:
                ps, omegas, inits = (list(xs) for xs in zip(*terms))
                F.proximal_(ps, omegas, inits, lr=float(group["lr"]), reg_lambda=lam,
                            foreach=self.foreach)

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """λ Σ Ω (θ − θ*)² over the optimizer's regularised parameters (Eq. 3), for logging."""
        return F.penalty((lam, p, o, c) for _, lam, terms in self._groups(with_grad=False)
                         for p, o, c in terms)


def add_mas_penalty(
    optimizer: torch.optim.Optimizer,
    reg_params: Optional[RegParams] = None,
    reg_lambda: float = 0.01,
    *,
    model: Optional[nn.Module] = None,
    proximal: bool = False,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> MasPenalty:
    r"""Attach the MAS penalty λ Σ Ω (θ − θ*)² (paper Eq. 3) to any torch optimizer.

    A step pre-hook adds 2λΩ(θ − θ*) to ``.grad`` of every regularised parameter, so the
    optimizer's step equals its step on ``loss + λ Σ Ω (θ − θ*)²`` through autograd (for
    ``maximize=True`` groups the penalty is still descended). With ``step(closure)`` (LBFGS)
    the penalty is added inside the closure, after it computed the gradient, and its value to
    the loss the closure returns. The optimizer's own update, state and options are torch's.
    Hooks are not pickled by torch: after ``copy.deepcopy``/``pickle`` of the optimizer, attach
    again.

    The optimizer's ``state_dict()`` then carries Ω and θ* per regularised parameter
    (``"mas_omega"``, ``"mas_init_val"`` in its state) and λ per group (``"reg_lambda"``), and
    its ``load_state_dict()`` restores them, so a framework's checkpoint of the optimizer keeps
    the penalty. Attached after such a load, it takes them from the optimizer's state (torch's
    Adam refuses to load a state with Ω/θ* alone, saved before a parameter's first step:
    attach the penalty before loading such a state dict).

    The penalty is added when ``step()`` runs, after any gradient clipping (and after
    ``GradScaler.unscale_``): clipping sees the task gradient only. After the step ``.grad``
    holds the task gradient plus 2λΩ(θ − θ*) (θ before the step), on every implementation;
    with ``proximal=True`` it holds the task gradient.

    Args:
        optimizer: any ``torch.optim.Optimizer``, or a framework's wrapper of one
            (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); its
            parameters are matched to ``reg_params`` by the names it was built with
            (``model.named_parameters()``) or, for parameters without names, by identity in
            ``model.named_parameters()``.
        reg_params: ``{name: {"omega": Ω, "init_val": θ*}}``; ``None``: those a state dict
            loaded into the optimizer before the penalty was attached (HF Trainer loads its
            checkpoint before callbacks run), else none, with one warning.
        reg_lambda: λ ≥ 0 (per group: a ``"reg_lambda"`` key in the group overrides it; a
            loaded state dict sets it).
        model: needed when the optimizer was built from unnamed parameters.
        proximal: instead of the gradient, apply the exact proximal map
            θ ← θ* + (θ − θ*)/(1 + 2·lr·λ·Ω) after each step. Defined only for
            ``torch.optim.SGD`` (a step of θ − lr·d); refused for adaptive optimizers, whose
            per-coordinate step sizes make this map something else.
        foreach, fused: how the penalty is added (see
            :func:`mas_optim.functional.implementation`; ``None``: the device's default).

    Returns:
        a :class:`MasPenalty`; ``.remove()`` detaches it, ``.penalty()`` gives its value.
    """
    return MasPenalty(optimizer, reg_params, reg_lambda, model=model, proximal=proximal,
                      foreach=foreach, fused=fused)
