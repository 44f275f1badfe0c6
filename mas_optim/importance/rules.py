"""The table from module type to its per-sample rule (one small file per layer kind)."""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from . import attention, conv, embedding, linear, norm, rnn
from .base import Rule

RULES: Dict[type, Rule] = {nn.Linear: linear.RULE, nn.Embedding: embedding.RULE,
                           nn.MultiheadAttention: attention.RULE,
                           **conv.RULES, **norm.RULES, **rnn.RULES}


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of the nearest base class in the table whose ``forward`` the module still uses
    (a subclass that overrides ``forward`` may compute anything: it has no rule)."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None
