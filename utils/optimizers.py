"""``--optimizer``: SGD with the MAS penalty inside its step (``mas_optim.LocalSgd``, the
original's optimizer and the default), or Adam/AdamW with the penalty added to the gradient
before torch's own update (``mas_optim.add_mas_penalty``), as the literature's benchmarks
train (Hsu et al. 2018, van de Ven & Tolias 2019: Adam, lr 1e-3).

The optimizer's whole state (LocalSgd's momentum, Adam's moments and step count) is in its
``state_dict``, which the checkpoint holds, so a resumed run continues bit-identically; the
penalty's hooks hold no state and are attached again when the optimizer is rebuilt.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import mas_optim
from utils import AppError

OPTIMIZERS = ("sgd", "adam", "adamw")
ADAPTIVE_LR = 1e-3  # --init_lr of adam/adamw when not given (torch's default; Hsu et al.'s)
MOMENTUM = 0.9


def resolve(given: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's defaults for the flags left out, and its refusals: --init_lr 1e-3 and
    --penalty_step gradient for adam/adamw, proximal for sgd."""
    name = values.get("optimizer", "sgd")
    if name == "sgd":
        return {**values, "penalty_step": values.get("penalty_step") or "proximal"}
    if values.get("penalty_step") == "proximal":
        raise AppError(f"--penalty_step proximal is SGD's step; --optimizer {name} rescales "
                       "each coordinate's step, so it takes the penalty's gradient: drop "
                       "--penalty_step (or give gradient)")
    if values.get("method") == "si":
        raise AppError(f"--method si tracks its path integral inside SGD's step: use "
                       f"--optimizer sgd with it, not {name}")
    lr = given.get("init_lr") or ADAPTIVE_LR
    return {**values, "penalty_step": "gradient", "init_lr": lr}


def check_sharding(config: Any) -> None:
    """--fsdp checkpoints LocalSgd's state sharded; Adam's step count (a 0-dim tensor beside the
    sharded moments) is not handled there yet, so a resume could not continue: refused."""
    if config.fsdp and config.optimizer != "sgd":
        raise AppError(f"--fsdp supports --optimizer sgd only (a sharded {config.optimizer} "
                       "state could not be resumed): drop --fsdp (torchrun then uses DDP) or "
                       "use --optimizer sgd")


def build_optimizer(config: Any, named: list[tuple[str, nn.Parameter]], reg_params: Any,
                    reg_lambda: float, track_path_integral: bool
                    ) -> tuple[torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    """The task's optimizer over the ``named`` trainable parameters, and the function that
    gives the MAS penalty's current value (for the log). ``reg_lambda`` is this task's λ (a
    number: ``--reg_lambda auto`` has chosen it by now)."""
    if config.optimizer == "sgd":
        sgd = mas_optim.LocalSgd(named, reg_params=reg_params, reg_lambda=reg_lambda,
                                 lr=config.init_lr, momentum=MOMENTUM,
                                 proximal=config.penalty_step == "proximal",
                                 track_path_integral=track_path_integral)
        return sgd, sgd.penalty
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    adaptive = kind(named, lr=config.init_lr)
    penalty = mas_optim.add_mas_penalty(adaptive, reg_params, reg_lambda)
    return adaptive, penalty.penalty
