r"""``nn.Conv1d/2d/3d``: y = W ⋆ a + b.

Over the unfolded input U_k (one column per output position l, holding the input patch that
position sees), a convolution is a matmul, so sample k's gradient is
:math:`\partial W = \sum_l g_{kl} u_{kl}^\top = G_k U_k^\top` per group and
:math:`\partial b = \sum_l g_{kl}`. G_k U_kᵀ is formed for a few samples at a time, then |·| and
summed over samples; with a single output position it is an outer product and
:math:`\sum_k |g_k u_k^\top| = |G|^\top |U|` is one matmul. Every padding (numbers,
``"same"``, ``"valid"``) and ``padding_mode`` is reproduced by padding the input as the layer
does before unfolding it.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Rule, add_abs_matmul_sums, same_dim_in_and_out


def _check(m: nn.Module, call: Call) -> bool:
    # batched input only: (B, C, *spatial) with the samples on dim 0
    return same_dim_in_and_out(call) == 0 and call.input.dim() == len(m.kernel_size) + 2


def _padding(m: nn.Module) -> list:
    """F.pad's (last dim first) padding the layer applies, as in torch's own _ConvNd."""
    if m.padding == "valid":
        return [0, 0] * len(m.kernel_size)
    if m.padding == "same":
        pad = []
        for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return pad
    return [p for p in reversed(m.padding) for _ in range(2)]


def unfold(m: nn.Module, a: Tensor) -> Tensor:
    """(B, C·∏kernel, L): every output position's input patch, as the layer sees it."""
    pad = _padding(m)
    if any(pad):
        a = F.pad(a, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    n = len(m.kernel_size)
    # windows as strided views, copied once by the final reshape (2-10x faster on a CPU than
    # F.unfold's im2col, which handles 2-D only)
    u = a
    for i, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        u = u.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # windows appended as last dims
    B, C = a.shape[:2]
    # (B, C, L1..Ln, k1..kn) -> (B, C, k1..kn, L1..Ln) -> (B, C·∏k, L)
    u = u.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return u.reshape(B, C * math.prod(m.kernel_size), -1)


def _apply(m: nn.Module, call: Call, acc: Dict[str, Tensor]) -> None:
    a, g = call.input, call.grad
    B, G = a.shape[0], m.groups
    g = g.reshape(B, G, -1, g[0, 0].numel())                   # (B, G, Cout/G, L)
    if "weight" in acc:
        u = unfold(m, a)
        u = u.reshape(B, G, -1, u.shape[-1])                    # (B, G, Cin/G·∏k, L)
        w = acc["weight"].view(G, -1, u.shape[2])               # (G, Cout/G, Cin/G·∏k)
        if u.shape[-1] == 1:                                     # one position: |G|ᵀ|U|
            w.add_(torch.einsum("bgo,bgi->goi", g[..., 0].abs(), u[..., 0].abs()).to(w.dtype))
        else:
            add_abs_matmul_sums(w, g, u.transpose(2, 3))
    if "bias" in acc:
        acc["bias"].add_(g.sum(3).abs().sum(0).reshape(-1).to(acc["bias"].dtype))


RULES = {cls: Rule(_check, _apply) for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
