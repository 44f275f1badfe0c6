r"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (any number of layers, bidirectional, LSTM ``proj_size``).

Every weight of a recurrent layer enters through a linear map at each step t:
:math:`\tilde x_t = W_{ih} x_t + b_{ih}`, :math:`\tilde h_t = W_{hh} h_{t-1} + b_{hh}` (and an LSTM
with ``proj_size``: :math:`h_t = W_{hr} r_t`). Sample k's gradients are therefore
:math:`\partial W_{ih} = \sum_t \tilde g^{x}_{kt} x_{kt}^\top`,
:math:`\partial W_{hh} = \sum_t \tilde g^{h}_{kt} h_{k,t-1}^\top`,
:math:`\partial W_{hr} = \sum_t g^{h}_{kt} r_{kt}^\top`, and the biases the sums of
:math:`\tilde g`, where :math:`\tilde g` are the gradients of Σ_k ‖F(x_k)‖² with respect to
those maps' outputs. The fused kernel does not expose them, so the recurrence is run again from
the layer's recorded input and initial state with the same equations as torch (gates
i, f, g, o for the LSTM; r, z, n for the GRU, with r acting on W_hn h + b_hn), and one backward
from the recorded output gradients gives every :math:`\tilde g` (for the LSTM and the plain RNN
the two maps are added, so :math:`\tilde g^{h}_t = \tilde g^{x}_t`); the per-sample sums are then
the :mod:`~mas_optim.importance.linear` rule over the time steps.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import Call, Rule
from .linear import add_outer_sums


def _check(m: nn.RNNBase, call: Call) -> bool:
    x = call.args[0] if call.args else None
    if not isinstance(x, Tensor) or x.dim() != 3 or not call.in_leaves or call.in_leaves[0] is not x:
        return False
    if call.in_dims[0] != (0 if m.batch_first else 1):
        return False
    states_ok = all(d == 1 for t, d in zip(call.in_leaves[1:], call.in_dims[1:])
                    if isinstance(t, Tensor))
    n_out = 3 if isinstance(m, nn.LSTM) else 2
    return (states_ok and len(call.out_leaves) == n_out
            and call.out_dims == [call.in_dims[0]] + [1] * (n_out - 1))


def _cell(mode: str, gi: Tensor, gh: Optional[Tensor], h: Tensor, c: Optional[Tensor],
          w_hh: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """One step, as torch's kernels compute it; returns (h_t before projection, c_t). For the
    GRU ``gh`` is W_hh h + b_hh; otherwise ``gi`` already holds both biases and ``gh`` is None."""
    if mode == "GRU":
        ir, iz, inn = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, None
    gates = torch.addmm(gi, h, w_hh.t())
    if mode == "LSTM":
        H = c.shape[1]
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
        c = torch.addcmul(f * c, i, torch.tanh(gates[:, 2 * H:3 * H]))
        return o * torch.tanh(c), c
    return (torch.tanh(gates) if mode == "RNN_TANH" else torch.relu(gates)), None


def _apply(m: nn.RNNBase, call: Call, acc: Dict[str, Tensor]) -> None:
    x = call.args[0].detach()
    x = x if m.batch_first else x.transpose(0, 1)              # (B, T, in)
    B, T = x.shape[:2]
    lstm, gru = m.mode == "LSTM", m.mode == "GRU"
    D, L = 2 if m.bidirectional else 1, m.num_layers
    H, P = m.hidden_size, (m.proj_size or m.hidden_size) if lstm else m.hidden_size
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    if hx is None:
        h0 = x.new_zeros(L * D, B, P)
        c0 = x.new_zeros(L * D, B, H) if lstm else None
    else:
        h0, c0 = (hx[0].detach(), hx[1].detach()) if lstm else (hx.detach(), None)
    weight = lambda n: getattr(m, n).detach()  # noqa: E731

    with torch.enable_grad():
        records = []
        h_n, c_n = [], []
        layer_in = x
        for layer in range(L):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                b_ih = weight("bias_ih" + sfx) if m.bias else None
                b_hh = weight("bias_hh" + sfx) if m.bias else None
                w_hh = weight("weight_hh" + sfx)
                gi_all = torch.nn.functional.linear(layer_in, weight("weight_ih" + sfx), b_ih)
                if b_hh is not None and not gru:  # LSTM/RNN add the two maps: ∂/∂x̃ = ∂/∂h̃
                    gi_all = gi_all + b_hh
                if not gi_all.requires_grad:  # the first layer: a leaf, its gradient is needed
                    gi_all.requires_grad_(True)
                gi_steps = gi_all.unbind(1)  # one backward node for all steps, not one per step
                h, c = h0[layer * D + d], (c0[layer * D + d] if lstm else None)
                h_prev, ghs, rs, hps, ys = ([None] * T for _ in range(5))
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    h_prev[t] = h
                    gh = None
                    if gru:
                        gh = torch.nn.functional.linear(h, w_hh, b_hh)
                        if not gh.requires_grad:  # the first step, from the given initial state
                            gh.requires_grad_(True)
                        ghs[t] = gh
                    r, c = _cell(m.mode, gi_steps[t], gh, h, c, w_hh)
                    if lstm and m.proj_size:
                        rs[t] = r
                        r = hps[t] = torch.nn.functional.linear(r, weight("weight_hr" + sfx))
                    h = ys[t] = r
                records.append((sfx, layer_in, gi_all, h_prev, ghs if gru else [],
                                rs if m.proj_size else [], hps if m.proj_size else []))
                h_n.append(h)
                if lstm:
                    c_n.append(c)
                outs.append(torch.stack(ys, 1))
            layer_in = torch.cat(outs, 2) if D == 2 else outs[0]
        y = layer_in if m.batch_first else layer_in.transpose(0, 1)
        produced = [y, torch.stack(h_n)] + ([torch.stack(c_n)] if lstm else [])
        pairs = [(o, g) for o, g in zip(produced, call.grads) if g is not None]
        wrt: List[Tensor] = []
        for _, _, gi_all, _, ghs, _, hps in records:
            wrt += [gi_all, *ghs, *hps]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    pos = 0
    for sfx, inp, gi_all, h_prev, ghs, rs, hps in records:
        g_gi = grads[pos]
        g_gh = torch.stack(grads[pos + 1:pos + 1 + len(ghs)], 1) if ghs else g_gi
        g_hp = grads[pos + 1 + len(ghs):pos + 1 + len(ghs) + len(hps)]
        pos += 1 + len(ghs) + len(hps)
        add_outer_sums(inp.detach(), g_gi, acc.get("weight_ih" + sfx), acc.get("bias_ih" + sfx))
        add_outer_sums(torch.stack(h_prev, 1).detach(), g_gh, acc.get("weight_hh" + sfx),
                       acc.get("bias_hh" + sfx))
        if hps:
            add_outer_sums(torch.stack(rs, 1).detach(), torch.stack(g_hp, 1),
                           acc.get("weight_hr" + sfx))


RULES = {cls: Rule(_check, _apply) for cls in (nn.RNN, nn.LSTM, nn.GRU)}
