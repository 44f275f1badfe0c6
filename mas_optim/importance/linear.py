r"""``nn.Linear`` (and subclasses that keep its ``forward``): y = W a + b.

Sample k's gradient is :math:`\partial W = \sum_t g_{kt} a_{kt}^\top`, summed over the positions
t it uses the layer at (one position for (B, in) inputs), and :math:`\partial b = \sum_t g_{kt}`:

* one position: :math:`\sum_k |g_k a_k^\top| = |G|^\top |A|`, a single matmul;
* several: :math:`\sum_t g_{kt} a_{kt}^\top` is formed per sample (a batched matmul over a
  few samples at a time, :func:`~mas_optim.importance.base.add_abs_matmul_sums`), then |·| and
  summed.

The samples may sit on any dimension but the last (e.g. (T, B, in) in a sequence-first model).
"""

from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from .base import Call, Rule, add_abs_matmul_sums, same_dim_in_and_out


def _check(m: nn.Linear, call: Call) -> bool:
    d = same_dim_in_and_out(call)
    return d is not None and d < call.input.dim() - 1


def rows(t: Tensor, d: int) -> Tensor:
    """(B, positions, features): samples first, every other dimension but the last flattened."""
    t = t.movedim(d, 0)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def add_outer_sums(a: Tensor, g: Tensor, acc_w: Tensor = None, acc_b: Tensor = None) -> None:
    """acc_w += Σ_k |Σ_t g_kt a_ktᵀ|, acc_b += Σ_k |Σ_t g_kt| for a, g of shape (B, T, ·)."""
    T = a.shape[1]
    if acc_w is not None:
        if T == 1:
            acc_w.addmm_(g[:, 0].abs().t().to(acc_w.dtype), a[:, 0].abs().to(acc_w.dtype))
        else:
            add_abs_matmul_sums(acc_w, g.transpose(1, 2), a)
    if acc_b is not None:
        acc_b.add_(g.sum(1).abs().sum(0).to(acc_b.dtype))


def _apply(m: nn.Linear, call: Call, acc: Dict[str, Tensor]) -> None:
    d = call.only_input()
    add_outer_sums(rows(call.input, d), rows(call.grad, d), acc.get("weight"), acc.get("bias"))


RULE = Rule(_check, _apply)
