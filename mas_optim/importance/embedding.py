r"""``nn.Embedding``: row v of the output is W[v] at every position holding token v.

Sample k's gradient of row v sums the output gradients of *all* its positions holding v before
the absolute value: :math:`\partial W_{v} = \sum_{t:\,i_{kt}=v} g_{kt}` (divided by the count of v
in the sample with ``scale_grad_by_freq``; positions holding ``padding_idx`` get no gradient).
The (sample, token) pairs are grouped with one ``unique``, their gradients summed with one
``index_add``, and :math:`\Omega_v \mathrel{+}= \sum_k |\partial W_{v}|` is a second
``index_add`` over the distinct pairs: no (B, vocabulary) tensor is formed.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .base import Call, Rule, same_dim_in_and_out


def _check(m: nn.Embedding, call: Call) -> bool:
    # max_norm renormalises rows of W in place during forward: left to the generic path
    return same_dim_in_and_out(call) is not None and m.max_norm is None


def _apply(m: nn.Embedding, call: Call, acc: Dict[str, Tensor]) -> None:
    if "weight" not in acc:
        return
    d = call.only_input()
    idx = call.input.movedim(d, 0)
    B, V = idx.shape[0], m.num_embeddings
    idx = idx.reshape(B, -1)
    g = call.grad.movedim(d, 0).reshape(B, idx.shape[1], -1)
    sample = torch.arange(B, device=idx.device).unsqueeze(1).expand_as(idx)
    keep = idx != m.padding_idx if m.padding_idx is not None else None
    key = (sample * V + idx).reshape(-1)
    g = g.reshape(-1, g.shape[-1])
    if keep is not None:
        key, g = key[keep.reshape(-1)], g[keep.reshape(-1)]
    pairs, which = torch.unique(key, return_inverse=True)
    per_pair = torch.zeros(len(pairs), g.shape[1], dtype=g.dtype, device=g.device)
    per_pair.index_add_(0, which, g)            # Σ over a sample's repeats of a token
    if m.scale_grad_by_freq:
        per_pair /= torch.bincount(which, minlength=len(pairs)).unsqueeze(1).to(g.dtype)
    w = acc["weight"]
    w.index_add_(0, pairs % V, per_pair.abs_().to(w.dtype))


RULE = Rule(_check, _apply)
