"""LocalSgd's Synaptic Intelligence path integral and its proximal penalty step."""

import copy

import pytest
import torch
from torch import nn

import mas_optim
from mas_optim import LocalSgd
from optim_reference import (IMPLEMENTATIONS, SGD_OPTIONS, implementation_options,
                             options_id)


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def reg_for(model, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: {"omega": scale * torch.rand(p.shape, generator=g),
                "init_val": p.detach() + 0.2 * torch.randn(p.shape, generator=g)}
            for n, p in model.named_parameters()}


def data(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------- SI

def test_path_integral_by_hand_over_momentum_steps():
    model = make_mlp()
    reg = reg_for(model)
    opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=0.3, lr=0.1,
                   momentum=0.9, weight_decay=0.01, track_path_integral=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in data(5):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        task_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():  # Zenke et al.: w -= g * Δθ, g the task gradient
            w[n] -= task_grad[n] * (p.detach() - before[n])
    xi = 0.1
    got = opt.path_integral_omega(xi=xi)
    for n, p in model.named_parameters():
        want = w[n] / ((p.detach() - start[n]) ** 2 + xi)
        assert torch.allclose(got[n], want, atol=1e-7, rtol=1e-5), n
        assert want.abs().max() > 1e-4
    # reset: a second call right away has w = 0 and θ_start = θ
    again = opt.path_integral_omega(xi=xi)
    assert all(not t.any() for t in again.values())



def test_path_integral_omega_consolidates_like_any_omega():
    model = make_mlp()
    reg = mas_optim.init_reg_params(model)
    opt = LocalSgd(model.named_parameters(), reg_params=reg, lr=0.1, track_path_integral=True)
    for x, y in data(3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    got = opt.path_integral_omega(xi=0.1)
    before = {n: e["omega"].clone() for n, e in reg.items()}
    mas_optim.consolidate_reg_params(reg, model, got)
    for n, p in model.named_parameters():
        assert torch.equal(reg[n]["omega"], before[n] + got[n]), n
        assert torch.equal(reg[n]["init_val"], p.detach()), n


def test_path_integral_requires_tracking_and_valid_xi():
    model = make_mlp()
    with pytest.raises(RuntimeError, match="track_path_integral=True"):
        LocalSgd(model.named_parameters()).path_integral_omega()
    opt = LocalSgd(model.named_parameters(), track_path_integral=True)
    with pytest.raises(ValueError, match="Invalid xi value: 0"):
        opt.path_integral_omega(xi=0)


def test_tracking_does_not_change_the_trajectory():
    a, b = make_mlp(), make_mlp()
    reg = reg_for(a)
    opt_a = LocalSgd(a.named_parameters(), reg_params=reg, lr=0.1, momentum=0.9)
    opt_b = LocalSgd(b.named_parameters(), reg_params=copy.deepcopy(reg), lr=0.1, momentum=0.9,
                     track_path_integral=True)
    for x, y in data(4):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- proximal

@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
def test_proximal_step_is_sgd_then_the_exact_proximal_map(hp, impl):
    lr, lam = hp["lr"], 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = reg_for(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=reg, reg_lambda=lam, **hp,
                   proximal=True, **implementation_options(impl))
    for x, y in data(4):
        opt_ref.zero_grad()
        loss_of(ref, x, y).backward()
        opt_ref.step()
        with torch.no_grad():  # θ ← θ* + (θ − θ*) / (1 + 2·lr·λ·Ω)
            for n, p in ref.named_parameters():
                o, a = reg[n]["omega"], reg[n]["init_val"]
                p.copy_(a + (p - a) / (1 + 2 * lr * lam * o))
        opt.zero_grad()
        loss_of(ours, x, y).backward()
        opt.step()
        for p, q in zip(ref.parameters(), ours.parameters()):
            assert (p - q).abs().max().item() <= 1e-6


@pytest.mark.filterwarnings("ignore:LocalSgd. 2·lr·λ·max Ω:RuntimeWarning")
def test_proximal_is_stable_where_the_explicit_step_diverges():
    lam, lr = 1e6, 0.1
    results = {}
    for proximal in (False, True):
        model = make_mlp()
        reg = reg_for(model, scale=1.0)
        opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=lam, lr=lr,
                       momentum=0.9, proximal=proximal)
        for x, y in data(10):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        results[proximal] = (model, reg)
    model, reg = results[True]
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        # a huge λ pins every parameter with Ω > 0 to θ*
        assert (p - reg[n]["init_val"]).abs().max() < 1e-3
    explicit, _ = results[False]
    assert any(not torch.isfinite(p).all() or p.abs().max() > 1e6 for p in explicit.parameters())


def test_proximal_agrees_with_explicit_step_as_lr_lambda_omega_vanishes():
    lr = 0.05
    for lam, tol in ((1e-2, 1e-5), (1e-4, 1e-7)):
        models = {}
        for proximal in (False, True):
            model = make_mlp()
            opt = LocalSgd(model.named_parameters(), reg_params=reg_for(model), reg_lambda=lam,
                           lr=lr, proximal=proximal)
            x, y = data(1)[0]
            loss_of(model, x, y).backward()
            opt.step()
            models[proximal] = model
        diff = max((p - q).abs().max().item()
                   for p, q in zip(models[False].parameters(), models[True].parameters()))
        assert diff <= tol, (lam, diff)
