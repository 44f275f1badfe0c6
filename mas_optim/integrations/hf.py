"""MAS for Hugging Face ``transformers.Trainer`` (``pip install mas-optim[hf]``).

Importing this module imports ``transformers``; ``import mas_optim`` never does. One callback
for the whole sequence of tasks::

    mas = MasCallback(reg_lambda=1.0)
    for task in tasks:
        Trainer(model=model, args=args, train_dataset=task, callbacks=[mas]).train()

At ``on_train_begin`` the penalty of the tasks learnt so far goes on whatever optimizer the
Trainer built (its default AdamW, or ``optimizers=(LocalSgd(...), None)``; accelerate's
wrapper is unwrapped). At ``on_train_end`` the callback computes the task's Ω on the Trainer's
train dataloader (labels dropped: Ω needs none) and folds it into its reg_params.

**Resuming.** The penalty's Ω, θ* and λ are part of the optimizer's own state dict, which
every Trainer checkpoint holds. Trainer loads it before callbacks see ``on_train_begin``, so
when a run resumes (``state.global_step > 0``) the callback takes its reg_params from the
loaded optimizer state and attaches the penalty with them: the resumed steps equal the
uninterrupted ones, from a checkpoint anywhere. Resuming from a checkpoint whose optimizer
state carries none (saved in the first task, or without the callback) while the callback
holds reg_params of earlier tasks is an error.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Union

from transformers import TrainerCallback

from ..reg_params import RegParams
from .tasks import MasTasks

__all__ = ["MasCallback"]


class MasCallback(TrainerCallback):
    """Memory Aware Synapses across the tasks of successive ``Trainer.train()`` calls.

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

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0 and not self.mas.resume(optimizer, model) \
                and self.mas.reg_params:
            raise ValueError(
                f"MasCallback: resuming at step {state.global_step} from a checkpoint whose "
                "optimizer state carries no Ω/θ* (saved in the first task or without the "
                "callback), while the callback holds reg_params of earlier tasks")
        self.mas.attach(optimizer, model)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.mas.learn(model, _inputs(train_dataloader))


def _inputs(loader) -> Iterator[Mapping[str, Any]]:
    """The Trainer's batches without their labels (Ω needs none; the loss is not F)."""
    for batch in loader:
        yield {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, Mapping) \
            else batch
