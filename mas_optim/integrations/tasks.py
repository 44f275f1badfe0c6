"""MasTasks: what every framework adapter does around a task, in one place.

Before a task's training, :meth:`MasTasks.attach` puts the penalty λ Σ Ω (θ − θ*)² (Eq. 3) on
the optimizer the framework built: ``LocalSgd`` gets the reg_params, any other optimizer a
penalty from :func:`mas_optim.add_mas_penalty` (a framework's wrapper such as accelerate's
``AcceleratedOptimizer`` or Lightning's ``LightningOptimizer`` is unwrapped first). After it,
:meth:`MasTasks.learn` computes the task's Ω (:func:`mas_optim.compute_omega`) and folds it into
reg_params (:func:`mas_optim.consolidate_reg_params`, θ* = the weights now). Nothing happens
before the first task has been learnt: with Ω = 0 the penalty is zero. Where a framework loads
a checkpoint's optimizer state before any callback runs (HF Trainer), :meth:`MasTasks.resume`
takes the reg_params from that state: Ω, θ* and λ travel in the optimizer's state dict.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from .._state import has_loaded_entries
from ..importance import compute_omega
from ..local_sgd import LocalSgd
from ..penalty import MasPenalty, add_mas_penalty
from ..reg_params import RegParams, consolidate_reg_params, parse_accumulate


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (``.optimizer``), or the optimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"MAS needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class MasTasks:
    """reg_params across tasks, and the penalty on the current optimizer.

    Args:
        reg_lambda: λ of Eq. 3 for an optimizer that is not a ``LocalSgd`` (LocalSgd uses its
            own ``reg_lambda``).
        accumulate: ``"sum"`` (the paper) or α in [0, 1], see
            :func:`mas_optim.reg_params.parse_accumulate`.
        reg_params: what earlier tasks left (e.g. :func:`mas_optim.load_reg_params`); empty
            by default.
        omega_kwargs: further keyword arguments of :func:`mas_optim.compute_omega`
            (``per_sample``, ``method``, ``forward_fn``, ``output_fn``).
    """

    def __init__(self, reg_lambda: Optional[float] = None, *,
                 accumulate: Union[str, float] = "sum", reg_params: Optional[RegParams] = None,
                 omega_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.reg_lambda = reg_lambda
        self.accumulate = parse_accumulate(accumulate)
        self.reg_params: RegParams = reg_params if reg_params is not None else {}
        self.omega_kwargs = dict(omega_kwargs or {})
        self.penalty: Optional[MasPenalty] = None

    def __getstate__(self) -> Dict[str, Any]:
        # torch drops optimizer hooks when pickling (a framework's checkpoint of the whole
        # trainer, e.g. Avalanche's): the penalty is attached again at the next task
        return {**self.__dict__, "penalty": None}

    def resume(self, optimizer: Any, model: nn.Module) -> bool:
        """Take up the reg_params that a checkpoint's optimizer state carried in, for a
        framework that loads the optimizer before any callback runs (HF Trainer): they replace
        the ones held, and the penalty is attached with them. False where the state carried
        none (a checkpoint of the first task). ``LocalSgd`` read its own on loading."""
        opt = unwrap_optimizer(optimizer)
        if isinstance(opt, LocalSgd):
            if not opt.reg_params:
                return False
            self.reg_params = opt.reg_params
            return True
        if not has_loaded_entries(opt):
            return False
        self._check_reg_lambda(opt)
        self.penalty = add_mas_penalty(opt, None, self.reg_lambda, model=model)
        self.reg_params = self.penalty.reg_params
        return True

    def _check_reg_lambda(self, opt: torch.optim.Optimizer) -> None:
        if self.reg_lambda is None:
            raise ValueError(f"reg_lambda=... is needed for {type(opt).__name__} (only "
                             "LocalSgd takes its own reg_lambda)")

    def attach(self, optimizer: Any, model: nn.Module) -> None:
        """The penalty of the tasks learnt so far on ``optimizer`` (again after reg_params
        changed, or on a new optimizer); nothing before the first task is learnt."""
        if not self.reg_params:
            return
        opt = unwrap_optimizer(optimizer)
        if isinstance(opt, LocalSgd):
            opt.reg_params = self.reg_params
            return
        self._check_reg_lambda(opt)
        if self.penalty is not None and self.penalty.optimizer is opt and self.penalty.attached:
            self.penalty.reg_params = self.reg_params
        else:
            self.penalty = add_mas_penalty(opt, self.reg_params, self.reg_lambda, model=model)

    def learn(self, model: nn.Module, batches: Iterable, **omega_kwargs: Any) -> None:
        """After a task: its Ω on ``batches``, folded into reg_params with θ* = the weights
        now. Trainable parameters that have no entry yet (a new head or adapter) join."""
        omega = compute_omega(model, batches, **{**self.omega_kwargs, **omega_kwargs})
        for name, p in model.named_parameters():
            if p.requires_grad and name not in self.reg_params:
                self.reg_params[name] = {
                    "omega": torch.zeros_like(p, memory_format=torch.contiguous_format),
                    "init_val": p.detach().clone(memory_format=torch.contiguous_format)}
        consolidate_reg_params(self.reg_params, model, omega, accumulate=self.accumulate)
