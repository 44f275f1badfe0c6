"""MAS for Lightning (``pip install mas-optim[lightning]``).

Importing this module imports ``lightning``; ``import mas_optim`` never does. One callback for
the whole sequence of tasks::

    mas = MasCallback(reg_lambda=1.0)
    for task in tasks:
        L.Trainer(max_epochs=2, callbacks=[mas]).fit(module, task)

At ``on_train_start`` the penalty of the tasks learnt so far goes on the optimizers
``configure_optimizers`` returned (``LocalSgd`` gets the reg_params, any other optimizer a
penalty from :func:`mas_optim.add_mas_penalty`). At ``on_train_end`` the callback computes the
task's Ω on the trainer's train dataloader (batches as :func:`mas_optim.compute_omega` takes
them: ``x``, ``(x, y, ...)`` or a dict; ``omega_kwargs={"forward_fn": ...}`` otherwise) and
folds it into its reg_params.

**Resuming.** The reg_params are the callback's state (``state_dict``), which Lightning saves
in every checkpoint and restores on ``fit(ckpt_path=...)`` before ``on_train_start``: the
resumed steps equal the uninterrupted ones.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from lightning.pytorch import Callback

from ..reg_params import RegParams
from .tasks import MasTasks

__all__ = ["MasCallback"]


class MasCallback(Callback):
    """Memory Aware Synapses across the tasks of successive ``Trainer.fit()`` calls.

    Args:
        reg_lambda: λ of Eq. 3 (not used by a ``LocalSgd``, which has its own).
        accumulate: ``"sum"`` (the paper) or α in [0, 1].
        reg_params: what earlier tasks left (e.g. from :func:`mas_optim.load_reg_params`).
        omega_kwargs: further keyword arguments of :func:`mas_optim.compute_omega`.

    Attributes:
        mas: the :class:`~mas_optim.integrations.tasks.MasTasks` (``mas.reg_params``).
    """

    def __init__(self, reg_lambda: Optional[float] = None, *,
                 accumulate: Union[str, float] = "sum", reg_params: Optional[RegParams] = None,
                 omega_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.mas = MasTasks(reg_lambda, accumulate=accumulate, reg_params=reg_params,
                            omega_kwargs=omega_kwargs)

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer in trainer.optimizers:
            self.mas.attach(optimizer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.mas.learn(pl_module, trainer.train_dataloader)

    def state_dict(self) -> Dict[str, Any]:
        return {"reg_params": self.mas.reg_params}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.mas.reg_params = state_dict["reg_params"]
