"""add_mas_penalty against its definition: the same optimizer on loss + λΣΩ(θ − θ*)² through
autograd."""

import copy

import pytest
import torch
from torch import nn

import mas_optim
from mas_optim import add_mas_penalty
from mas_optim import functional
from optim_reference import (HOST_OPTIMIZERS, PENALTY_IMPLEMENTATIONS, SGD_OPTIONS,
                             autograd_penalty, batches, host_id, make_mlp, options_id,
                             random_reg_params, step)


@pytest.mark.parametrize("impl", PENALTY_IMPLEMENTATIONS)
@pytest.mark.parametrize("cls, hp", HOST_OPTIMIZERS, ids=[host_id(o) for o in HOST_OPTIMIZERS])
def test_equals_the_optimizer_on_the_penalised_loss(cls, hp, impl):
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref, skip=("2.bias",))
    opt_ref = cls(ref.parameters(), **hp)
    opt = cls(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, **PENALTY_IMPLEMENTATIONS[impl])
    for x, y in batches(6):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("impl", PENALTY_IMPLEMENTATIONS)
def test_the_gradient_after_a_step_is_the_task_gradient_plus_the_penalty(impl):
    """On every implementation, and whatever the host (here AdamW's fused step)."""
    lam = 0.7
    model = make_mlp()
    reg = random_reg_params(model)
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01, fused=True)
    add_mas_penalty(opt, reg, reg_lambda=lam, **PENALTY_IMPLEMENTATIONS[impl])
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    want = {n: p.grad + 2 * lam * reg[n]["omega"] * (p.detach() - reg[n]["init_val"])
            for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-6, msg=n)


def test_the_penalty_alone_is_single_tensor_on_the_cpu_and_fused_true_says_so():
    params = list(make_mlp().parameters())
    impl, why = functional.implementation(params, penalty_only=True)
    assert impl == "single_tensor" and "no fused step" in why
    model = make_mlp()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    add_mas_penalty(opt, random_reg_params(model), reg_lambda=0.7, fused=True)
    with pytest.warns(RuntimeWarning, match="fused=True: the penalty alone has no fused step"):
        step(model, opt, *batches(1)[0])


def test_penalty_changes_the_trajectory():
    """Guards the reference: with λ > 0 the result differs from the plain optimizer."""
    plain, ours = make_mlp(), make_mlp()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.01)
    opt = torch.optim.AdamW(ours.named_parameters(), lr=0.01)
    add_mas_penalty(opt, random_reg_params(ours), reg_lambda=5.0)
    for x, y in batches(3):
        step(plain, opt_plain, x, y)
        step(ours, opt, x, y)
    assert max((a - b).abs().max().item()
               for a, b in zip(plain.parameters(), ours.parameters())) > 1e-3


@pytest.mark.parametrize("impl", PENALTY_IMPLEMENTATIONS)
def test_maximize_still_descends_the_penalty(impl):
    lam, hp = 0.5, dict(lr=0.01, maximize=True)
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), **hp)
    opt = torch.optim.Adam(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, **PENALTY_IMPLEMENTATIONS[impl])
    for x, y in batches(4):  # ascending task − penalty
        step(ref, opt_ref, x, y, lambda: -autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unnamed_optimizer_is_matched_through_the_model():
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.RMSprop(ref.parameters(), lr=0.01)
    opt = torch.optim.RMSprop(ours.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="have no names"):
        add_mas_penalty(opt, reg, reg_lambda=lam)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, model=ours)
    for x, y in batches(4):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_parameters_appended_without_names_are_stepped_without_penalty():
    ref, ours = make_mlp(), make_mlp()
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(list(ours[0].named_parameters(prefix="0")), lr=0.01)
    opt.param_groups[0]["params"].extend(ours[2].parameters())  # a loop adding a head
    reg = {n: {"omega": torch.zeros_like(p), "init_val": p.detach().clone()}
           for n, p in ours[0].named_parameters(prefix="0")}
    add_mas_penalty(opt, reg, reg_lambda=1.0)
    for x, y in batches(3):
        step(ref, opt_ref, x, y)
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_remove_detaches_the_penalty():
    plain, ours = make_mlp(), make_mlp()
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt = torch.optim.Adam(ours.named_parameters(), lr=0.01)
    mas = add_mas_penalty(opt, random_reg_params(ours), reg_lambda=5.0)
    assert mas.attached
    mas.remove()
    assert not mas.attached
    for x, y in batches(3):
        step(plain, opt_plain, x, y)
        step(ours, opt, x, y)
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attach", ["before-load", "after-load"])
def test_state_dict_restores_the_penalty_in_a_fresh_optimizer_bit_identically(attach):
    """The contract framework checkpoints rely on: state_dict() of an optimizer carrying the
    penalty, load_state_dict() into a fresh one of the same kind (the penalty attached before
    or after the load, without reg_params) restores Ω, θ* and λ."""
    a, b = make_mlp(), make_mlp()
    opt_a = torch.optim.AdamW(a.named_parameters(), lr=0.01)
    add_mas_penalty(opt_a, random_reg_params(a), reg_lambda=0.7)
    data = batches(6)
    for x, y in data[:3]:
        step(a, opt_a, x, y)
    sd = copy.deepcopy(opt_a.state_dict())
    assert sd["param_groups"][0]["reg_lambda"] == 0.7
    assert {"exp_avg", "mas_omega", "mas_init_val"} <= set(sd["state"][0])
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.named_parameters(), lr=0.01)
    if attach == "before-load":
        with pytest.warns(UserWarning, match="no reg_params given and none loaded"):
            mas_b = add_mas_penalty(opt_b)
        opt_b.load_state_dict(sd)
    else:
        opt_b.load_state_dict(sd)
        mas_b = add_mas_penalty(opt_b)
        assert all("mas_omega" not in st for st in opt_b.state.values())
    assert mas_b.penalty().item() > 0
    for x, y in data[3:]:
        step(a, opt_a, x, y)
        step(b, opt_b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_state_dict_saved_before_any_step_leaves_lazy_state_to_the_optimizer():
    """Only Ω/θ* in a parameter's saved state: Adam must still initialise its own state at its
    first step (the penalty, attached before the load, takes them out)."""
    model = make_mlp()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    add_mas_penalty(opt, random_reg_params(model), reg_lambda=0.7)
    sd = opt.state_dict()
    fresh = torch.optim.Adam(model.named_parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="none loaded"):
        mas = add_mas_penalty(fresh)
    fresh.load_state_dict(sd)
    assert len(mas.reg_params) == 4 and not fresh.state
    step(model, fresh, *batches(1)[0])
    assert all("exp_avg" in st for st in fresh.state.values())


def test_a_state_dict_without_the_penalty_says_so_and_keeps_reg_params():
    model = make_mlp()
    reg = random_reg_params(model)
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    mas = add_mas_penalty(opt, reg, reg_lambda=0.7)
    plain = torch.optim.AdamW(make_mlp().named_parameters(), lr=0.01)
    with pytest.warns(UserWarning, match=r"carries no Ω/θ\*.*keeping add_mas_penalty's "
                                         r"reg_params \(4 entries\)"):
        opt.load_state_dict(plain.state_dict())
    assert mas.reg_params is reg


def test_reg_params_given_after_a_load_that_carried_some_are_used_and_said():
    model = make_mlp()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    add_mas_penalty(opt, random_reg_params(model), reg_lambda=0.7)
    step(model, opt, *batches(1)[0])
    fresh = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    mine = random_reg_params(model, seed=5)
    with pytest.warns(UserWarning, match="using the reg_params given"):
        mas = add_mas_penalty(fresh, mine, reg_lambda=0.7)
    assert mas.reg_params is mine
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in fresh.state.values())


def test_group_reg_lambda_overrides_the_default():
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    groups = lambda m, named: [  # noqa: E731
        {"params": list(m[0].named_parameters(prefix="0")) if named else list(m[0].parameters()),
         "reg_lambda": 0.0},
        {"params": list(m[2].named_parameters(prefix="2")) if named else list(m[2].parameters())}]
    opt_ref = torch.optim.Adam(groups(ref, False), lr=0.01)
    opt = torch.optim.Adam(groups(ours, True), lr=0.01)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=0.7)
    head_only = {n: e for n, e in reg.items() if n.startswith("2.")}
    for x, y in batches(4):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, head_only, 0.7))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", PENALTY_IMPLEMENTATIONS)
@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
def test_proximal_for_sgd_is_the_step_then_the_exact_proximal_map(hp, impl):
    lr, lam = hp["lr"], 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = torch.optim.SGD(ours.named_parameters(), **hp)
    add_mas_penalty(opt, reg, reg_lambda=lam, proximal=True, **PENALTY_IMPLEMENTATIONS[impl])
    for x, y in batches(4):
        step(ref, opt_ref, x, y)
        with torch.no_grad():  # θ ← θ* + (θ − θ*) / (1 + 2·lr·λ·Ω)
            for n, p in ref.named_parameters():
                o, a = reg[n]["omega"], reg[n]["init_val"]
                p.copy_(a + (p - a) / (1 + 2 * lr * lam * o))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_proximal_is_refused_where_it_is_not_defined():
    model = make_mlp()
    with pytest.raises(ValueError, match="proximal=True is defined for torch.optim.SGD"):
        add_mas_penalty(torch.optim.AdamW(model.named_parameters()),
                        random_reg_params(model), proximal=True)


def test_bad_reg_params_and_lambda_are_refused_with_the_name():
    model = make_mlp()
    opt = torch.optim.Adam(model.named_parameters())
    reg = random_reg_params(model)
    reg["0.weight"]["omega"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"reg_params\['0.weight'\]\['omega'\] holds NaN"):
        add_mas_penalty(opt, reg)
    with pytest.raises(ValueError, match="Invalid reg_lambda value: -1"):
        add_mas_penalty(opt, random_reg_params(model), reg_lambda=-1)
    opt.param_groups[0]["reg_lambda"] = -2.0
    add_mas_penalty(opt, random_reg_params(model))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="Invalid reg_lambda value: -2.0"):
        opt.step()
    with pytest.raises(TypeError, match="LocalSgd already applies"):
        add_mas_penalty(mas_optim.LocalSgd(model.named_parameters()), random_reg_params(model))


def test_penalty_value():
    model = make_mlp()
    reg = random_reg_params(model, skip=("2.bias",))
    mas = add_mas_penalty(torch.optim.Adam(model.named_parameters()), reg, reg_lambda=0.25)
    torch.testing.assert_close(mas.penalty(), autograd_penalty(model, reg, 0.25).detach())


# ------------------------------------------------------------------ framework wrappers

def _accelerate_wrapper(opt):
    accelerate = pytest.importorskip("accelerate")
    wrapped = accelerate.Accelerator(cpu=True).prepare_optimizer(opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    return wrapped


def _lightning_wrapper(opt):
    lightning = pytest.importorskip("lightning")
    return lightning.pytorch.core.optimizer.LightningOptimizer(opt)


@pytest.mark.parametrize("wrap", [_accelerate_wrapper, _lightning_wrapper],
                         ids=["accelerate", "lightning"])
def test_a_framework_wrapped_optimizer_gets_the_penalty(wrap):
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01)
    opt = torch.optim.AdamW(ours.named_parameters(), lr=0.01)
    wrapped = wrap(opt)
    mas = add_mas_penalty(wrapped, copy.deepcopy(reg), reg_lambda=lam)
    assert mas.optimizer is opt
    for x, y in batches(3):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_what_is_not_an_optimizer_is_refused_in_one_line():
    with pytest.raises(TypeError, match=r"^add_mas_penalty needs a torch.optim.Optimizer, got "
                                        r"dict: pass the torch optimizer it wraps$"):
        add_mas_penalty({"lr": 0.1}, {})


def test_a_state_dict_without_the_penalty_is_silent_when_there_is_nothing_to_keep(recwarn):
    model = make_mlp()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    mas = add_mas_penalty(opt, None, reg_lambda=0.7)
    opt.load_state_dict(torch.optim.AdamW(make_mlp().named_parameters(), lr=0.01).state_dict())
    assert not [w for w in recwarn if "carries no" in str(w.message)]
    assert not mas.reg_params
