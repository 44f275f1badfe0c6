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

from .integrations.tasks import MasTasks
from .reg_params import RegParams

__all__ = ["MasPlugin"]


class MasPlugin(SupervisedPlugin):
    """Memory Aware Synapses for an Avalanche strategy.

    Args:
        reg_lambda: λ of Eq. 3 when the strategy's optimizer is not a ``LocalSgd`` (LocalSgd
            uses its own ``reg_lambda``).
        accumulate: ``"sum"`` (the paper) or α in [0, 1], see
            :func:`mas_optim.reg_params.parse_accumulate`.
        batch_size: batch size of the importance pass.
        omega_kwargs: further keyword arguments of :func:`mas_optim.compute_omega`
            (``per_sample``, ``method``).

    Attributes:
        mas: the :class:`~mas_optim.integrations.tasks.MasTasks` that keeps reg_params and
            puts the penalty on the strategy's optimizer (shared with the other frameworks'
            adapters); ``reg_params`` and ``reg_lambda`` are its.
    """

    def __init__(self, reg_lambda: Optional[float] = None, *,
                 accumulate: Union[str, float] = "sum", batch_size: int = 64,
                 omega_kwargs: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.mas = MasTasks(reg_lambda, accumulate=accumulate, omega_kwargs=omega_kwargs)
        self.batch_size = batch_size

    @property
    def reg_params(self) -> RegParams:
        return self.mas.reg_params

    @property
    def reg_lambda(self) -> Optional[float]:
        return self.mas.reg_lambda

    @reg_lambda.setter
    def reg_lambda(self, value: Optional[float]) -> None:
        self.mas.reg_lambda = value

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        # After a checkpoint is loaded or the optimizer is replaced, the hook must be attached
        # again (torch does not pickle optimizer hooks).
        if self.reg_params:
            self._follow_growth(strategy.model)
            self.mas.attach(strategy.optimizer, strategy.model)

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

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        loader = torch.utils.data.DataLoader(strategy.experience.dataset,
                                             batch_size=self.batch_size, shuffle=False)
        # a MultiTaskModule: each sample through its own task's head, F of the task it learnt
        task_labels = ({"forward_fn": _with_task_labels}
                       if isinstance(strategy.model, MultiTaskModule)
                       and "forward_fn" not in self.mas.omega_kwargs else {})
        self.mas.learn(strategy.model, _on(loader, strategy.device), **task_labels)
        self.mas.attach(strategy.optimizer, strategy.model)


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
