r"""``nn.MultiheadAttention``: out = softmax(q kᵀ/√d + mask) v W_oᵀ + b_o per head, with
q = W_q x_q + b_q, k = W_k x_k + b_k, v = W_v x_v + b_v (``in_proj_weight`` stacks W_q, W_k, W_v).

Every weight enters through a linear map applied at each position, so sample k's gradients are
:math:`\partial W_q = \sum_t g^q_{kt} x^q_{kt}{}^\top` (likewise W_k, W_v, and W_o with the
attention context as input) and the biases the sums of the g's. The output gradient is
recorded; g^q, g^k, g^v are not exposed by torch's attention, so the attention is run again
from the recorded inputs (the same equations: masks added, softmax, weights averaged over heads
when returned) and one backward from the recorded output gradients gives them. The per-sample
sums are then the :mod:`~mas_optim.importance.linear` rule over the positions. Layouts the rule
does not reproduce (``add_bias_kv``, ``add_zero_attn``, the ``is_causal`` hint, per-head 3-D
masks) take the generic path.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Rule
from .linear import add_outer_sums

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_NAMES = frozenset({"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                    "v_proj_weight", "out_proj.weight", "out_proj.bias"})


def _arguments(m: nn.MultiheadAttention, call: Call) -> Dict[str, Any]:
    bound = _SIGNATURE.bind(m, *call.args, **call.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _check(m: nn.MultiheadAttention, call: Call) -> bool:
    try:
        a = _arguments(m, call)
    except TypeError:
        return False
    bd = 0 if m.batch_first else 1
    qkv = [a["query"], a["key"], a["value"]]
    if (m.bias_k is not None or m.add_zero_attn or a["is_causal"]
            or not all(isinstance(t, Tensor) and t.dim() == 3 and call.dim_of(t) == bd
                       for t in qkv)):
        return False
    mask, kpm = a["attn_mask"], a["key_padding_mask"]
    if mask is not None and (mask.dim() != 2 or call.dim_of(mask) is not None):
        return False
    if kpm is not None and (kpm.dim() != 2 or call.dim_of(kpm) != 0):
        return False
    weights_ok = (len(call.out_leaves) == 2 and (call.out_leaves[1] is None
                                                 or call.out_dims[1] == 0))
    return weights_ok and call.out_dims[0] == bd


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask,
                                                                             float("-inf"))


def _apply(m: nn.MultiheadAttention, call: Call, acc: Dict[str, Tensor]) -> None:
    a = _arguments(m, call)
    first = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
    xq, xk, xv = (first(a[n]).detach() for n in ("query", "key", "value"))   # (B, L|S, E)
    B, L, E = xq.shape
    S, H = xk.shape[1], m.num_heads
    hd = E // H
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.detach().chunk(3)
    else:
        wq, wk, wv = (m.q_proj_weight.detach(), m.k_proj_weight.detach(),
                      m.v_proj_weight.detach())
    bq, bk, bv = (m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None
                  else (None, None, None))
    g_out = first(call.grads[0]) if call.grads[0] is not None else None
    g_weights = call.grads[1] if len(call.grads) > 1 else None
    with torch.enable_grad():
        q, k, v = (F.linear(x, w, b).requires_grad_() for x, w, b in
                   ((xq, wq, bq), (xk, wk, bk), (xv, wv, bv)))
        scores = (q.view(B, L, H, hd).transpose(1, 2) * hd ** -0.5) @ \
            k.view(B, S, H, hd).transpose(1, 2).transpose(2, 3)       # (B, H, L, S)
        mask = _float_mask(a["attn_mask"], scores.dtype)
        kpm = _float_mask(a["key_padding_mask"], scores.dtype)
        if mask is not None:
            scores = scores + mask
        if kpm is not None:
            scores = scores + kpm.view(B, 1, 1, S)
        weights = torch.softmax(scores, -1)
        ctx = (weights @ v.view(B, S, H, hd).transpose(1, 2)).transpose(1, 2).reshape(B, L, E)
        pairs = []
        if g_out is not None:
            pairs.append((ctx, g_out.matmul(m.out_proj.weight.detach())))  # ∂/∂ctx
        if g_weights is not None:
            pairs.append((weights.mean(1) if a["average_attn_weights"] else weights, g_weights))
        if not pairs:
            return
        gq, gk, gv = torch.autograd.grad([t for t, _ in pairs], [q, k, v],
                                         [g for _, g in pairs], allow_unused=True)
    if g_out is not None:
        add_outer_sums(ctx.detach(), g_out, acc.get("out_proj.weight"), acc.get("out_proj.bias"))
    in_w, in_b = acc.get("in_proj_weight"), acc.get("in_proj_bias")
    for i, (x, g, name) in enumerate(((xq, gq, "q_proj_weight"), (xk, gk, "k_proj_weight"),
                                      (xv, gv, "v_proj_weight"))):
        if g is None:
            continue
        w = in_w[i * E:(i + 1) * E] if in_w is not None else acc.get(name)
        add_outer_sums(x, g, w, in_b[i * E:(i + 1) * E] if in_b is not None else None)


RULE = Rule(_check, _apply, _NAMES)
