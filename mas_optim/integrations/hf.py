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

**Resuming.** Trainer loads a checkpoint's optimizer state *before* callbacks see
``on_train_begin``, and its callbacks' saved state is JSON. So the callback writes its
reg_params next to each checkpoint (``checkpoint-N/mas_reg_params.pickle``, at ``on_save``) and,
when a run resumes (``state.global_step > 0`` at ``on_train_begin``), reads them back from
``args.resume_from_checkpoint`` or else ``<output_dir>/checkpoint-<global_step>``; then it
attaches the penalty, so the resumed steps equal the uninterrupted ones. A resumed run whose
checkpoint has no such file while the callback holds reg_params is an error (a run of the
first task saves none: nothing to penalise yet). A checkpoint elsewhere than ``output_dir`` must
be named in ``TrainingArguments(resume_from_checkpoint=...)``: ``train(resume_from_checkpoint=)``
does not tell callbacks where it loaded from.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from transformers import TrainerCallback

from ..reg_params import RegParams, load_reg_params, save_reg_params
from .tasks import MasTasks

__all__ = ["MasCallback"]

FILE = "mas_reg_params.pickle"


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
        if state.global_step > 0:
            self._resume(args, state, model)
        self.mas.attach(optimizer, model)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.mas.learn(model, _inputs(train_dataloader))

    def on_save(self, args, state, control, **kwargs):
        if self.mas.reg_params and state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", FILE)
            save_reg_params(self.mas.reg_params, path)

    def _resume(self, args, state, model) -> None:
        folder = (args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str)
                  else os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        path = os.path.join(folder, FILE)
        if os.path.exists(path):
            self.mas.reg_params = load_reg_params(path, model=model)
        elif self.mas.reg_params:
            raise ValueError(f"MasCallback: resuming at step {state.global_step}, but {path} "
                             "does not exist; pass the checkpoint folder as "
                             "TrainingArguments(resume_from_checkpoint=...)")


def _inputs(loader) -> Iterator[Mapping[str, Any]]:
    """The Trainer's batches without their labels (Ω needs none; the loss is not F)."""
    for batch in loader:
        yield {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, Mapping) \
            else batch
