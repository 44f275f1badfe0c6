"""MAS as an Avalanche plugin (optional: ``pip install mas-optim[avalanche]``).

Importing this module imports ``avalanche``; ``import mas_optim`` never does. Example::

    from mas_optim.avalanche import MasPlugin

    opt = mas_optim.LocalSgd(model.named_parameters(), reg_lambda=1.0, lr=0.01, momentum=0.9)
    strategy = Naive(model, opt, CrossEntropyLoss(), plugins=[MasPlugin()], ...)
    for experience in benchmark.train_stream:
        strategy.train(experience)

After each training experience the plugin computes that experience's importance Ω (paper Eq. 2,
:func:`mas_optim.compute_omega` on its training data, labels ignored; a ``MultiTaskModule``
gets each sample's task label, ``model(x, t)``, so every sample goes through its own task's
head, also in an experience with several tasks), folds it into its
reg_params (:func:`mas_optim.consolidate_reg_params`, θ* = the current weights) and hands them
to the optimizer: ``LocalSgd``'s ``reg_params``, or, for any other torch optimizer, a penalty
attached with :func:`mas_optim.add_mas_penalty`. Parameters Avalanche adds later (a new task's
head) join reg_params at the next consolidation; a head that grows new output units keeps the
importance of its old ones. The plugin's state (reg_params) is part of the
strategy, so Avalanche's ``save_checkpoint``/``maybe_load_checkpoint`` carry it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

from .importance import compute_omega
from .local_sgd import LocalSgd
from .penalty import MasPenalty, add_mas_penalty
from .reg_params import RegParams, consolidate_reg_params, parse_accumulate

__all__ = ["MasPlugin"]


class MasPlugin(SupervisedPlugin):
    """Memory Aware Synapses for an Avalanche strategy.

    Args:
        reg_lambda: λ of Eq. 3 when the strategy's optimizer is not a ``LocalSgd`` (LocalSgd
            uses its own ``reg_lambda``).
        accumulate: ``"sum"`` (the paper) or α in [0, 1], see :func:`parse_accumulate`.
        batch_size: batch size of the importance pass.
        omega_kwargs: further keyword arguments of :func:`mas_optim.compute_omega`
            (``per_sample``, ``method``).
    """

    def __init__(self, reg_lambda: Optional[float] = None, *,
                 accumulate: Union[str, float] = "sum", batch_size: int = 64,
                 omega_kwargs: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.reg_lambda = reg_lambda
        self.accumulate = parse_accumulate(accumulate)
        self.batch_size = batch_size
        self.omega_kwargs = dict(omega_kwargs or {})
        self.reg_params: RegParams = {}
        self._penalty: Optional[MasPenalty] = None

    def __getstate__(self) -> Dict[str, Any]:
        # torch drops optimizer hooks when pickling; the penalty is re-attached on resume.
        return {k: v for k, v in self.__dict__.items() if k != "_penalty"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._penalty = None

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        # After a checkpoint is loaded or the optimizer is replaced, the hook must be attached
        # again (torch does not pickle optimizer hooks).
        if self.reg_params:
            self._follow_growth(strategy.model)
            self._hand_over(strategy)

    @torch.no_grad()
    def _follow_growth(self, model: nn.Module) -> None:
        """A head that grew new output units (Avalanche's IncrementalClassifier) keeps Ω and θ*
        of its old units; the new ones start unregularised (Ω = 0, θ* = θ)."""
        named = dict(model.named_parameters())
        for name, entry in self.reg_params.items():
            p = named.get(name)
            old = entry["omega"].shape
            if p is None or old == p.shape:
                continue
            if p.dim() != len(old) or p.shape[1:] != old[1:] or p.shape[0] < old[0]:
                raise ValueError(f"MasPlugin: parameter {name!r} changed shape from "
                                 f"{tuple(old)} to {tuple(p.shape)}; only new output units "
                                 "(growth along dim 0) can keep their importance")
            omega = torch.zeros_like(p, memory_format=torch.contiguous_format)
            init = p.detach().clone(memory_format=torch.contiguous_format)
            omega[:old[0]] = entry["omega"]
            init[:old[0]] = entry["init_val"]
            entry["omega"], entry["init_val"] = omega, init

    @torch.no_grad()
    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        model = strategy.model
        omega = self._omega(strategy)
        for name, p in model.named_parameters():
            if p.requires_grad and name not in self.reg_params:  # e.g. a head added since
                self.reg_params[name] = {
                    "omega": torch.zeros_like(p, memory_format=torch.contiguous_format),
                    "init_val": p.detach().clone(memory_format=torch.contiguous_format)}
        consolidate_reg_params(self.reg_params, model, omega, accumulate=self.accumulate)
        self._hand_over(strategy)

    def _omega(self, strategy) -> Dict[str, Tensor]:
        loader = torch.utils.data.DataLoader(strategy.experience.dataset,
                                             batch_size=self.batch_size, shuffle=False)
        kwargs = dict(self.omega_kwargs)
        if isinstance(strategy.model, MultiTaskModule):
            # each sample through its own task's head: F of the task it was trained on
            kwargs.setdefault("forward_fn", _with_task_labels)
        return compute_omega(strategy.model, _on(loader, strategy.device), **kwargs)

    def _hand_over(self, strategy) -> None:
        opt = strategy.optimizer
        if isinstance(opt, LocalSgd):
            opt.reg_params = self.reg_params
            return
        if self.reg_lambda is None:
            raise ValueError(f"MasPlugin(reg_lambda=...) is needed for {type(opt).__name__} "
                             "(LocalSgd takes its own reg_lambda)")
        attached = (self._penalty is not None and self._penalty.optimizer is opt
                    and self._penalty.attached)
        if attached:
            self._penalty.reg_params = self.reg_params
        else:
            self._penalty = add_mas_penalty(opt, self.reg_params, self.reg_lambda,
                                            model=strategy.model)


def _with_task_labels(model: MultiTaskModule, batch) -> Tensor:
    """An Avalanche (x, y, t) batch through a MultiTaskModule: ``model(x, t)``."""
    return model(batch[0], batch[2])


class _on:
    """An Avalanche loader's (x, y, t) batches on the strategy's device."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield [t.to(self.device) for t in batch]

    def __len__(self) -> int:
        return len(self.loader)
