"""What a training loop changes between steps (reg_params in place or replaced, λ, a frozen or
replaced parameter, optimizer state) reaches the next step, on every implementation, with and
without a head that has no entry: LocalSgd and add_mas_penalty keep checked entries between
steps, and each change must still give torch's optimizer on the penalised loss."""

import copy

import pytest
import torch

import mas_optim
from optim_reference import (IMPLEMENTATIONS, PENALTY_IMPLEMENTATIONS, autograd_penalty, batches,
                             implementation_options, make_mlp, random_reg_params, sgd_pair,
                             step)

PATHS = list(IMPLEMENTATIONS)
HP = dict(lr=0.05, momentum=0.9)


def _options(path, request):
    return implementation_options(path)


def _new_entry(entry):
    return {"omega": entry["omega"] * 2, "init_val": entry["init_val"] + 0.1}


def _freeze(m):
    m[0].bias.requires_grad_(False)
    m[0].bias.grad = None


def _replace_first_weight(m, o):
    """Model surgery: a new Parameter object takes the first layer's place, in the model and in
    the optimizer's group (with no optimizer state, so its momentum starts again)."""
    new = torch.nn.Parameter(m[0].weight.detach().clone())
    m[0].weight = new
    o.param_groups[0]["params"][0] = new


def _halve_buffer(o, p):
    """A new momentum buffer object (half the old one) in the optimizer's state."""
    o.state[p]["momentum_buffer"] = o.state[p]["momentum_buffer"] * 0.5


def _off_path(o):
    o.param_groups[0].update(foreach=False, fused=False)


CHANGES = {
    # name: (change to ours, the same change to the reference; both get (model, opt, reg))
    "state cleared": (lambda m, o, r: o.state.clear(), lambda m, o, r: o.state.clear()),
    "omega changed in place": (lambda m, o, r: r["0.weight"]["omega"].mul_(3),
                               lambda m, o, r: r["0.weight"]["omega"].mul_(3)),
    "init_val changed in place": (lambda m, o, r: r["2.weight"]["init_val"].add_(0.5),
                                  lambda m, o, r: r["2.weight"]["init_val"].add_(0.5)),
    "entry replaced": (lambda m, o, r: r.__setitem__("2.weight", _new_entry(r["2.weight"])),
                       lambda m, o, r: r.__setitem__("2.weight", _new_entry(r["2.weight"]))),
    "reg_params replaced": (
        lambda m, o, r: setattr(o, "reg_params", {k: _new_entry(v) for k, v in r.items()}),
        lambda m, o, r: r.update({k: _new_entry(v) for k, v in r.items()})),
    "parameter memory replaced": (
        lambda m, o, r: setattr(m[0].weight, "data", m[0].weight.data.clone()),
        lambda m, o, r: None),
    "parameter frozen": (lambda m, o, r: _freeze(m), lambda m, o, r: _freeze(m)),
    "parameter object replaced": (lambda m, o, r: _replace_first_weight(m, o),
                                  lambda m, o, r: _replace_first_weight(m, o)),
    "momentum buffer replaced": (lambda m, o, r: _halve_buffer(o, m[2].weight),
                                 lambda m, o, r: _halve_buffer(o, m[2].weight)),
    "momentum buffer changed in place": (
        lambda m, o, r: o.state[m[0].bias]["momentum_buffer"].zero_(),
        lambda m, o, r: o.state[m[0].bias]["momentum_buffer"].zero_()),
    "head's momentum buffer replaced": (lambda m, o, r: _halve_buffer(o, m[2].bias),
                                        lambda m, o, r: _halve_buffer(o, m[2].bias)),
    "entry given to the head": (
        lambda m, o, r: r.__setitem__("2.bias", _bias_entry(m)),
        lambda m, o, r: r.__setitem__("2.bias", _bias_entry(m))),
    "head frozen": (lambda m, o, r: _freeze_head(m), lambda m, o, r: _freeze_head(m)),
    "implementation switched off": (lambda m, o, r: _off_path(o), lambda m, o, r: None),
}


def _bias_entry(m):
    return {"omega": torch.full_like(m[2].bias, 3.0), "init_val": m[2].bias.detach() + 1.0}


def _freeze_head(m):
    m[2].bias.requires_grad_(False)
    m[2].bias.grad = None


# (implementation, parameters without an entry: a new task's head, stepped by torch's SGD)
SETUPS = {f"{path}{suffix}": (path, head) for path in PATHS
          for suffix, head in (("", ()), ("-with-head", ("2.bias",)))}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("setup", SETUPS)
def test_every_change_between_steps_reaches_the_next_step(setup, change, request):
    path, head = SETUPS[setup]
    lam = 0.7
    ref, opt_ref, ours, opt, reg_ref = sgd_pair(HP, lam, skip=head, **_options(path, request))
    reg = opt.reg_params
    for i, (x, y) in enumerate(batches(7)):
        if i == 4:
            CHANGES[change][0](ours, opt, reg)
            CHANGES[change][1](ref, opt_ref, reg_ref)
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg_ref, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("path", PATHS)
def test_a_new_lambda_reaches_the_next_step(path, request):
    ref, opt_ref, ours, opt, reg = sgd_pair(HP, 0.7, **_options(path, request))
    for i, (x, y) in enumerate(batches(7)):
        lam = 0.7 if i < 4 else 2.0
        opt.param_groups[0]["reg_lambda"] = lam
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("entry", [True, False], ids=["penalised", "without-entry"])
@pytest.mark.parametrize("path", PATHS)
def test_a_parameter_unfrozen_between_steps_is_stepped(path, entry, request):
    """Unfrozen with an entry: penalised from then on; without one (a new task's head): torch's
    SGD step, never a silent skip."""
    lam = 0.7
    ref, opt_ref, ours, opt, reg = sgd_pair(HP, lam, skip=() if entry else ("0.bias",),
                                            **_options(path, request))
    for m in (ref, ours):
        m[0].bias.requires_grad_(False)
    for i, (x, y) in enumerate(batches(7)):
        if i == 4:
            for m in (ref, ours):
                m[0].bias.requires_grad_(True)
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


# ------------------------------------------------------------------ add_mas_penalty

HOOK_CHANGES = {
    # name: (change to ours, the same change to the reference; (model, optimizer, reg, penalty))
    "omega changed in place": (lambda m, o, r, h: r["0.weight"]["omega"].mul_(3),
                               lambda m, o, r, h: r["0.weight"]["omega"].mul_(3)),
    "init_val changed in place": (lambda m, o, r, h: r["2.weight"]["init_val"].add_(0.5),
                                  lambda m, o, r, h: r["2.weight"]["init_val"].add_(0.5)),
    "entry replaced": (
        lambda m, o, r, h: r.__setitem__("2.weight", _new_entry(r["2.weight"])),
        lambda m, o, r, h: r.__setitem__("2.weight", _new_entry(r["2.weight"]))),
    "parameter memory replaced": (
        lambda m, o, r, h: setattr(m[0].weight, "data", m[0].weight.data.clone()),
        lambda m, o, r, h: None),
    "parameter frozen": (lambda m, o, r, h: _freeze(m), lambda m, o, r, h: _freeze(m)),
    "parameter object replaced": (lambda m, o, r, h: _replace_first_weight(m, o),
                                  lambda m, o, r, h: _replace_first_weight(m, o)),
    "lambda changed": (lambda m, o, r, h: setattr(h, "reg_lambda", 2.0), None),
    "entry added for a parameter without one": (
        lambda m, o, r, h: r.__setitem__("2.bias", _bias_entry(m)),
        lambda m, o, r, h: r.__setitem__("2.bias", _bias_entry(m))),
}


@pytest.mark.parametrize("path", PENALTY_IMPLEMENTATIONS)
@pytest.mark.parametrize("change", HOOK_CHANGES)
def test_every_change_between_steps_reaches_the_next_penalty(change, path):
    """add_mas_penalty on AdamW against AdamW on the penalised loss; the last layer's bias has
    no entry (a head's parameter: AdamW steps it alone)."""
    ref, ours = make_mlp(), make_mlp()
    reg_ref = random_reg_params(ref, skip=("2.bias",))
    reg = copy.deepcopy(reg_ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.05)
    opt = torch.optim.AdamW(ours.named_parameters(), lr=0.01, weight_decay=0.05)
    hook = mas_optim.add_mas_penalty(opt, reg, reg_lambda=0.7, **PENALTY_IMPLEMENTATIONS[path])
    lam = 0.7
    for i, (x, y) in enumerate(batches(7)):
        if i == 4:
            HOOK_CHANGES[change][0](ours, opt, reg, hook)
            if HOOK_CHANGES[change][1] is not None:
                HOOK_CHANGES[change][1](ref, opt_ref, reg_ref, None)
            lam = hook.reg_lambda
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg_ref, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)
