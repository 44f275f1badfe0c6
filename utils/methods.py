"""``--method``: the one table from a method's name to the importance Omega it computes after a task.

Every method shares the penalty lambda * sum Omega (theta - theta*)^2 (MAS, Aljundi et al. 2018,
Eq. 3), which ``mas_optim.LocalSgd`` applies inside its step; methods differ only in how Omega
of the task just learnt is computed. To add one (``--method ewc``, say): write a function
``AfterTask -> {parameter name: Omega}`` below and add its entry to ``METHODS``; the flag's
choices and ``--help`` come from this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

import mas_optim

Omega = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AfterTask:
    """What an importance function may use, right after a task was trained."""

    model: nn.Module  # the plain model (never the DDP wrapper), current task's head on
    optimizer: torch.optim.Optimizer  # the optimizer that trained the task (LocalSgd for si)
    reg_params: dict[str, dict[str, torch.Tensor]]  # Omega and theta* before this task
    batches: Callable[[], Iterable[Any]]  # the inputs of --omega_data (no labels), fixed
    #                                       order, on the device; under torchrun this rank's share
    per_sample: bool  # --omega per-sample (Eq. 2) or batch (the original code's formula)


def mas(run: AfterTask) -> Omega:
    """Eq. 2: the mean over samples of |d ||F(x)||^2 / d theta| on the network's output; under
    torchrun ``compute_omega`` sums over the ranks' shards."""
    return mas_optim.compute_omega(run.model, run.batches(), per_sample=run.per_sample)


def lmas(run: AfterTask) -> Omega:
    """l-MAS (Sec. 4): Eq. 2 on each layer's own output, the Hebbian rule."""
    return mas_optim.compute_omega(run.model, run.batches(), per_sample=run.per_sample,
                                   method="local")


def si(run: AfterTask) -> Omega:
    """Synaptic Intelligence (Zenke et al. 2017): the path integral LocalSgd tracked while
    training. The same on every rank under torchrun: DDP makes the gradients and steps equal."""
    return run.optimizer.path_integral_omega()


def finetune(run: AfterTask) -> Omega:
    """No importance: plain fine-tuning."""
    return {name: torch.zeros_like(entry["omega"]) for name, entry in run.reg_params.items()}


@dataclass(frozen=True)
class Method:
    importance: Callable[[AfterTask], Omega]
    help: str
    penalty: bool = True  # False: reg_lambda is 0 (and giving one is an error)
    track_path_integral: bool = False  # LocalSgd tracks SI's path integral while training


METHODS: dict[str, Method] = {
    "mas": Method(mas, "the paper's global MAS, Eq. 2 on the network's output"),
    "lmas": Method(lmas, "the paper's local Hebbian variant, per layer"),
    "si": Method(si, "Synaptic Intelligence's path integral", track_path_integral=True),
    "finetune": Method(finetune, "no penalty", penalty=False),
}
