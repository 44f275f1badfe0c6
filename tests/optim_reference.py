"""Small models, reg_params and the autograd reference of the MAS penalty, for the optimizer
tests: λ Σ Ω (θ − θ*)² (Eq. 3) added to the loss and differentiated by autograd."""
from __future__ import annotations

import copy

import torch
from torch import nn

from mas_optim import LocalSgd


def make_mlp(seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def random_reg_params(model, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    return {n: {"omega": torch.rand(p.shape, generator=g) * 2,
                "init_val": p.detach() + 0.3 * torch.randn(p.shape, generator=g)}
            for n, p in model.named_parameters() if n not in skip}


def autograd_penalty(model, reg_params, lam):
    return lam * sum((reg_params[n]["omega"] * (p - reg_params[n]["init_val"]) ** 2).sum()
                     for n, p in model.named_parameters() if n in reg_params)


def batches(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(n)]


def step(model, opt, x, y, extra=None):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if extra is not None:
        loss = loss + extra()
    loss.backward()
    opt.step()


def sgd_pair(hp, lam=0.7, skip=(), **options):
    """Two equal MLPs: ``ref`` with ``torch.optim.SGD(**hp)``, to be stepped on the loss plus
    :func:`autograd_penalty` with ``reg``, and ``ours`` with ``LocalSgd(**hp, **options)`` on its
    own copy of ``reg`` (``opt.reg_params``). Returns (ref, opt_ref, ours, opt, reg)."""
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref, skip=skip)
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=copy.deepcopy(reg), reg_lambda=lam,
                   **hp, **options)
    return ref, opt_ref, ours, opt, reg
