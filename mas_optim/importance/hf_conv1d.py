r"""Hugging Face ``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections): despite
its name a linear layer, y = a W + b with W stored as (in, out), the transpose of
``nn.Linear``'s. Sample k's gradient is :math:`\partial W = \sum_t a_{kt} g_{kt}^\top`, formed
as for ``nn.Linear`` (:mod:`.linear`) into the transposed view of Ω.

The rule table (:mod:`.rules`) finds the class in ``sys.modules`` only: a model holding a
``Conv1D`` has imported ``transformers``, and mas_optim never imports it.
"""

from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from .base import Call, Rule, same_dim_in_and_out
from .linear import add_outer_sums, rows


def _check(m: nn.Module, call: Call) -> bool:
    d = same_dim_in_and_out(call)
    return d is not None and d < call.input.dim() - 1


def _apply(m: nn.Module, call: Call, acc: Dict[str, Tensor]) -> None:
    d = call.only_input()
    w = acc.get("weight")
    add_outer_sums(rows(call.input, d), rows(call.grad, d), None if w is None else w.t(),
                   acc.get("bias"))


RULE = Rule(_check, _apply)
