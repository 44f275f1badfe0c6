r"""l-MAS (paper Sec. 4): Eq. 2 on each layer's own function F_l(a) = W a + b.

∂‖F_l(a)‖²/∂W_ij = 2 z_i a_j is the product of the activities the connection joins (input
a_j, output z_i before any activation), so Ω_ij = (2/N) Σ_k |z_i(x_k)| |a_j(x_k)| — the Hebbian
rule — and one forward pass suffices. For a weight used at many positions (convolutions,
sequences) the co-activations at every position are summed, each in magnitude; since every
position of every sample is summed, the layout of the samples does not matter here. The layers
are ``nn.Linear`` and ``nn.Conv2d`` (zero, explicit padding); every other parameter gets its
global Ω (:class:`~mas_optim.importance.per_sample.PerSampleEngine`).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from .conv import unfold
from .per_sample import Forward, PerSampleEngine


def _hebbian_layer(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


class LocalEngine:
    """l-MAS from one forward pass, no backward; other parameters by the per-sample engine."""

    def __init__(self, model: nn.Module, params: Dict[str, Tensor], forward: Forward) -> None:
        self.model, self.forward = model, forward
        name_of = {id(p): n for n, p in params.items()}
        self.layers: Dict[nn.Module, Dict[str, str]] = {}
        for m in model.modules():
            if _hebbian_layer(m):
                own = {k: name_of[id(p)] for k, p in m.named_parameters(recurse=False)
                       if id(p) in name_of}
                if own:
                    self.layers[m] = own
        covered = {n for own in self.layers.values() for n in own.values()}
        rest = {n: p for n, p in params.items() if n not in covered}
        self.rest = PerSampleEngine(model, rest, forward) if rest else None

    def accumulate(self, batch: Any, n: int, sums: Dict[str, Tensor]) -> None:
        def hook(m: nn.Module, inputs: Tuple, out: Tensor) -> None:
            _HEBBIAN_RULES[type(m)](m, inputs[0].detach(), out.detach(), self.layers[m], sums)

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            with torch.no_grad():
                self.forward(batch)
        finally:
            for h in handles:
                h.remove()
        if self.rest is not None:
            self.rest.accumulate(batch, n, sums)


def _hebbian_linear(m: nn.Linear, a: Tensor, z: Tensor, own: Dict[str, str],
                    sums: Dict[str, Tensor]) -> None:
    a = a.reshape(-1, a.shape[-1]).abs()       # every position of every sample: (M, in)
    z = z.reshape(-1, z.shape[-1]).abs()       # (M, out)
    if "weight" in own:
        sums[own["weight"]].add_(z.t().mm(a).mul_(2).to(sums[own["weight"]]))   # 2|Z|ᵀ|A|
    if "bias" in own:
        sums[own["bias"]].add_(z.sum(0).mul_(2).to(sums[own["bias"]]))


def _hebbian_conv2d(m: nn.Conv2d, a: Tensor, z: Tensor, own: Dict[str, str],
                    sums: Dict[str, Tensor]) -> None:
    B, G = a.shape[0], m.groups
    if "weight" in own:
        u = unfold(m, a)
        L = u.shape[-1]
        # (G, B·L, Cin/G·kh·kw) and (G, Cout/G, B·L): one batched matmul over the groups
        u = u.abs().reshape(B, G, -1, L).permute(1, 0, 3, 2).reshape(G, B * L, -1)
        zz = z.abs().reshape(B, G, -1, L).permute(1, 2, 0, 3).reshape(G, -1, B * L)
        acc = sums[own["weight"]]
        acc.view(G, -1, acc[0].numel()).add_(zz.bmm(u).mul_(2).to(acc))
    if "bias" in own:
        sums[own["bias"]].add_(z.abs().sum((0, 2, 3)).mul_(2).to(sums[own["bias"]]))


_HEBBIAN_RULES = {nn.Linear: _hebbian_linear, nn.Conv2d: _hebbian_conv2d}
