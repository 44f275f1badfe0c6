"""The table from module type to its per-sample rule (one small file per layer kind)."""

from __future__ import annotations

import sys
from typing import Dict, Optional

from torch import nn

from . import attention, conv, embedding, hf_conv1d, linear, norm, rnn
from .base import Rule

RULES: Dict[type, Rule] = {nn.Linear: linear.RULE, nn.Embedding: embedding.RULE,
                           nn.MultiheadAttention: attention.RULE,
                           **conv.RULES, **norm.RULES, **rnn.RULES}


def _rule_of(cls: type) -> Optional[Rule]:
    rule = RULES.get(cls)
    if rule is None and cls.__name__ == "Conv1D":
        # transformers' Conv1D, looked up where the model's own import left it
        hf = sys.modules.get("transformers.pytorch_utils")
        if hf is not None and cls is getattr(hf, "Conv1D", None):
            return hf_conv1d.RULE
    return rule


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of the nearest base class in the table whose ``forward`` the module still uses
    (a subclass that overrides ``forward`` may compute anything: it has no rule)."""
    for cls in type(module).__mro__:
        rule = _rule_of(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None
