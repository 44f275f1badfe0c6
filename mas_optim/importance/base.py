"""What every per-sample rule is given (Call) and what it provides (Rule).

A rule adds Σ_k |∂‖F(x_k)‖²/∂θ| (sum over the samples k of one batch) for the parameters a
module holds directly, from what one batched forward and backward leave behind: the module's
input and the gradient of Σ_k ‖F(x_k)‖² with respect to its output (the *output gradient*).
In eval mode row k of that output gradient is ∂‖F(x_k)‖²/∂out_k, so the per-sample gradient of
a parameter is a function of sample k's input and output gradient alone; each rule forms it
without a per-sample forward or backward. Which dimension holds the samples is proven for every
call by the engine (see :mod:`mas_optim.importance.per_sample`), never assumed; a rule receives
it and refuses layouts it does not handle (``check``), which then take the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from torch import Tensor, nn

# Per-sample gradients are formed for at most this many elements at once (all rules and the
# torch.func path share it, so their peak memory is comparable).
BUDGET = 1 << 23


def chunk_size(numel_per_sample: int) -> int:
    """How many samples' per-sample gradients of ``numel_per_sample`` elements fit BUDGET."""
    return max(1, BUDGET // max(numel_per_sample, 1))


@dataclass
class Call:
    """One call of a module in the batched forward: inputs, outputs, their sample dimensions.

    ``in_leaves``/``out_leaves`` are the flattened positional-and-keyword inputs and the
    flattened output; ``in_dims``/``out_dims`` give each leaf's sample dimension (``None``:
    the leaf is the same for every sample, e.g. an attention mask). ``grads`` holds the
    output gradient of each output leaf (``None`` where no gradient reached it).
    """
    args: tuple
    kwargs: dict
    in_leaves: List[Any]
    out_leaves: List[Any]
    out_spec: Any = None
    in_dims: List[Optional[int]] = field(default_factory=list)
    out_dims: List[Optional[int]] = field(default_factory=list)
    grads: List[Optional[Tensor]] = field(default_factory=list)
    in_versions: List[int] = field(default_factory=list)
    out_versions: List[int] = field(default_factory=list)

    def only_input(self) -> Optional[int]:
        """Sample dimension of the single tensor input, or None if there is not exactly one."""
        tensors = [i for i, t in enumerate(self.in_leaves) if isinstance(t, Tensor)]
        if len(tensors) != 1 or len(self.args) < 1 or self.args[0] is not self.in_leaves[tensors[0]]:
            return None
        return self.in_dims[tensors[0]]

    @property
    def input(self) -> Tensor:
        return self.args[0]

    def only_output(self) -> Optional[int]:
        """Sample dimension of a single tensor output, or None."""
        if len(self.out_leaves) != 1 or not isinstance(self.out_leaves[0], Tensor):
            return None
        return self.out_dims[0]

    @property
    def grad(self) -> Optional[Tensor]:
        return self.grads[0]


class Rule(NamedTuple):
    """``check(module, call) -> bool``: the rule handles this call's layout.
    ``apply(module, call, acc)``: ``acc[attr] += Σ_k |per-sample gradient|`` for the module's
    own trainable parameters ``attr`` (e.g. ``"weight"``) present in ``acc``."""
    check: Callable[[nn.Module, Call], bool]
    apply: Callable[[nn.Module, Call, Dict[str, Tensor]], None]


def same_dim_in_and_out(call: Call) -> Optional[int]:
    """The sample dimension if the single input and the single output share it, else None."""
    d_in, d_out = call.only_input(), call.only_output()
    return d_in if d_in is not None and d_in == d_out else None
