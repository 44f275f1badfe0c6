"""mas_optim.grow_reg_params: a class-incremental head gains rows; its reg_params follow, the old
rows keep their Omega and theta*, and LocalSgd / AdamW + add_mas_penalty step the grown head
exactly as the autograd reference of the penalty lambda * sum Omega (theta - theta*)^2 does."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mas_optim
from optim_reference import autograd_penalty

OLD, NEW, WIDTH = 3, 5, 6


def _model(rows: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, rows)).double()


def _grown(old: nn.Sequential) -> nn.Sequential:
    """``old`` with a head of NEW rows: its OLD rows copied, the rest freshly initialised."""
    new = _model(NEW, seed=1)
    with torch.no_grad():
        new[0].load_state_dict(old[0].state_dict())
        new[2].weight[:OLD] = old[2].weight
        new[2].bias[:OLD] = old[2].bias
    return new


def _reg_params(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(3)
    return {n: {"omega": torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5,
                "init_val": p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)}
            for n, p in model.named_parameters()}


@pytest.fixture
def grown():
    old = _model(OLD)
    reg = _reg_params(old)
    model = _grown(old)
    return model, reg, mas_optim.grow_reg_params(reg, model)


def test_old_rows_keep_omega_and_theta_star(grown):
    model, old, new = grown
    for key in ("omega", "init_val"):
        assert torch.equal(new["2.weight"][key][:OLD], old["2.weight"][key])
        assert torch.equal(new["2.bias"][key][:OLD], old["2.bias"][key])
    assert new["2.weight"]["omega"].shape == (NEW, WIDTH)


def test_new_rows_start_unimportant_at_their_current_value(grown):
    model, _, new = grown
    assert torch.count_nonzero(new["2.weight"]["omega"][OLD:]) == 0
    assert torch.count_nonzero(new["2.bias"]["omega"][OLD:]) == 0
    assert torch.equal(new["2.weight"]["init_val"][OLD:], model[2].weight[OLD:])
    assert torch.equal(new["2.bias"]["init_val"][OLD:], model[2].bias[OLD:])


def test_entries_that_fit_are_kept_as_they_are(grown):
    _, old, new = grown
    assert new["0.weight"] is old["0.weight"] and new["0.bias"] is old["0.bias"]


def test_an_ungrown_entry_is_refused_by_local_sgd_with_its_name(grown):
    model, old, _ = grown
    with pytest.raises(ValueError, match=r"reg_params\['2.weight'\]\['omega'\] is \(3, 6\)"):
        mas_optim.LocalSgd(model.named_parameters(), reg_params=old, reg_lambda=1.0, lr=0.1)


@pytest.mark.parametrize("old_shape, needle", [((3, WIDTH), "shrinks"),
                                                 ((2, WIDTH, 1), "number of dimensions")])
def test_a_shrunk_or_reshaped_parameter_is_refused(old_shape, needle):
    reg = {"weight": {"omega": torch.zeros(old_shape), "init_val": torch.zeros(old_shape)}}
    with pytest.raises(ValueError, match=needle):
        mas_optim.grow_reg_params(reg, nn.Linear(WIDTH, 2))


def test_an_entry_the_model_lacks_is_a_key_error():
    reg = {"missing": {"omega": torch.zeros(1), "init_val": torch.zeros(1)}}
    with pytest.raises(KeyError, match="missing"):
        mas_optim.grow_reg_params(reg, nn.Linear(2, 2))


def _batch():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(7, 4, generator=g, dtype=torch.float64),
            torch.randint(0, NEW, (7,), generator=g))


def _reference_step(model, reg, lam, make_optimizer, steps=3):
    """``steps`` steps of a torch optimizer on the task loss + the autograd penalty."""
    ref = copy.deepcopy(model)
    opt = make_optimizer(ref.parameters())
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y) + autograd_penalty(ref, reg, lam)
        loss.backward()
        opt.step()
    return ref


def _steps(model, opt, steps=3):
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_grown_head_under_local_sgd_steps_as_the_autograd_reference(grown):
    model, _, reg = grown
    lam, hp = 0.7, dict(lr=0.05, momentum=0.9)
    ref = _reference_step(model, reg, lam, lambda ps: torch.optim.SGD(ps, **hp))
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_params=copy.deepcopy(reg),
                             reg_lambda=lam, **hp)
    _steps(model, opt)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def test_grown_head_under_adamw_with_the_penalty_steps_as_the_autograd_reference(grown):
    model, _, reg = grown
    lam, hp = 0.7, dict(lr=0.01, weight_decay=0.01)
    ref = _reference_step(model, reg, lam, lambda ps: torch.optim.AdamW(ps, **hp))
    opt = torch.optim.AdamW(model.named_parameters(), **hp)
    mas_optim.add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam)
    _steps(model, opt)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
