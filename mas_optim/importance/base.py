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

import torch
from torch import Tensor, nn

# Per-sample gradients are formed for at most this many elements at once (all rules and the
# torch.func path share it, so their peak memory is comparable).
BUDGET = 1 << 23
# On a CPU the rules form them in tiles that stay in cache between the matmul that writes a tile
# and the reduction that reads it (about 2-4x faster than memory-sized chunks).
CPU_TILE = 1 << 17


def chunk_size(numel_per_sample: int) -> int:
    """How many samples' per-sample gradients of ``numel_per_sample`` elements fit BUDGET."""
    return max(1, BUDGET // max(numel_per_sample, 1))


def add_abs_matmul_sums(acc: Tensor, left: Tensor, right: Tensor) -> None:
    r"""acc += Σ_k |left_k right_k| for left (B, *G, O, L), right (B, *G, L, I), acc (*G, O, I):
    the per-sample products are formed a tile of samples × output rows at a time, into one
    reused buffer (fresh memory for every tile would cost a page fault per 4 KiB written)."""
    B, O = left.shape[0], left.shape[-2]
    tile = CPU_TILE if left.device.type == "cpu" else BUDGET
    per_row = acc.numel() // O
    # a tile holds a few samples (the reduction over samples is then one vectorised sum)
    rows = max(1, min(O, tile // max(per_row * min(B, 8), 1)))
    step = max(1, min(B, tile // (per_row * rows)))
    dtype = torch.promote_types(left.dtype, right.dtype)
    buf = torch.empty(step * per_row * rows, dtype=dtype, device=left.device)
    red = torch.empty(per_row * rows, dtype=dtype, device=left.device)
    for o in range(0, O, rows):
        a, lo = acc[..., o:o + rows, :], left[..., o:o + rows, :]
        for s in range(0, B, step):
            n = min(step, B - s)
            out = buf[:n * a.numel()].view(n, *a.shape)
            torch.matmul(lo[s:s + n], right[s:s + n], out=out)
            r = red[:a.numel()].view(a.shape)
            torch.sum(out.abs_(), 0, out=r)
            a.add_(r)


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

    def dim_of(self, t: Tensor) -> Optional[int]:
        """Sample dimension of the input leaf ``t`` (by identity); None if shared or absent."""
        return next((d for leaf, d in zip(self.in_leaves, self.in_dims) if leaf is t), None)

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
    ``apply(module, call, acc)``: ``acc[name] += Σ_k |per-sample gradient|`` for the trainable
    parameters present in ``acc``, by name relative to the module (``"weight"``).
    ``names``: the parameters it covers, if not just the module's own (no ``.`` in the name)."""
    check: Callable[[nn.Module, Call], bool]
    apply: Callable[[nn.Module, Call, Dict[str, Tensor]], None]
    names: Optional[frozenset] = None

    def covers(self, name: str) -> bool:
        return name in self.names if self.names is not None else "." not in name


def same_dim_in_and_out(call: Call) -> Optional[int]:
    """The sample dimension if the single input and the single output share it, else None."""
    d_in, d_out = call.only_input(), call.only_output()
    return d_in if d_in is not None and d_in == d_out else None
