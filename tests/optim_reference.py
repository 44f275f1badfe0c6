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


# One table of optimizer options for the LocalSgd, add_mas_penalty, kernel and SI tests.
SGD_OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, weight_decay=0.05, maximize=True),
    dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.02),
    dict(lr=0.05, momentum=0.9, weight_decay=0.02, maximize=True),
]
# Other optimizers that carry add_mas_penalty: (class, options).
HOST_OPTIMIZERS = [
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, fused=True)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, amsgrad=True, foreach=False)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    (torch.optim.Adagrad, dict(lr=0.05)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
]
# The implementations of mas_optim.functional, by the options that choose them on the CPU
# (the penalty alone, add_mas_penalty's, has no fused one).
IMPLEMENTATIONS = {"fused": {}, "foreach": dict(foreach=True),
                   "single_tensor": dict(fused=False)}
PENALTY_IMPLEMENTATIONS = {"foreach": dict(foreach=True), "single_tensor": {}}


def options_id(hp):
    return ",".join(f"{k}={v}" for k, v in hp.items())


def host_id(item):
    cls, hp = item
    return cls.__name__ + ("-" + options_id(hp) if hp else "")


def require_fused():
    """The C kernel is built here; else skip, or fail under CI (CI=true), where a skip would
    hide a broken build."""
    import os

    import pytest

    from mas_optim import functional

    impl, why = functional.implementation([torch.zeros(1)])
    if impl != "fused":
        message = f"the fused C kernel is not available: {why}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def implementation_options(name):
    """The options that choose ``name`` (requiring the kernel for "fused")."""
    if name == "fused":
        require_fused()
    return IMPLEMENTATIONS[name]
