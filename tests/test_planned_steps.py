"""Planned steps: from the third step on, a LocalSgd group whose regularised parameters went the
same way (the C kernel on the CPU, the multi-tensor path on CUDA or with ``foreach=True``), the
others (a head without an entry) to torch's SGD, is stepped from what the last step found,
re-checking only what a loop can change between steps; add_mas_penalty's multi-tensor penalty
keeps its lists the same way. Every such change must still give torch's optimizer on the
penalised loss."""

import copy

import pytest
import torch

import mas_optim
from mas_optim import LocalSgd
from optim_reference import autograd_penalty, batches, make_mlp, random_reg_params, sgd_pair, step

# path: (LocalSgd options, the planned step it takes)
PATHS = {
    "kernel": ({}, "_planned_kernel_step"),
    "foreach": (dict(foreach=True), "_planned_foreach_step"),
}
HP = dict(lr=0.05, momentum=0.9)


def _options(path, request):
    if path == "kernel":
        request.getfixturevalue("kernel_calls")  # skips where the C kernels are not built
    return PATHS[path][0]


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
}


def _bias_entry(m):
    return {"omega": torch.full_like(m[2].bias, 3.0), "init_val": m[2].bias.detach() + 1.0}


def _freeze_head(m):
    m[2].bias.requires_grad_(False)
    m[2].bias.grad = None


def _spy_on_plans(monkeypatch, method):
    planned = []
    real = getattr(LocalSgd, method)

    def spy(self, *args):
        planned.append(real(self, *args))
        return planned[-1]

    monkeypatch.setattr(LocalSgd, method, spy)
    return planned


# (path, parameters without an entry): both plans step those with torch's SGD (a new task's
# head).
SETUPS = {"kernel": ("kernel", ()), "kernel-with-head": ("kernel", ("2.bias",)),
          "foreach": ("foreach", ()), "foreach-with-head": ("foreach", ("2.bias",))}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("setup", SETUPS)
def test_every_change_between_steps_reaches_the_planned_step(setup, change, monkeypatch,
                                                             request):
    path, head = SETUPS[setup]
    lam = 0.7
    ref, opt_ref, ours, opt, reg_ref = sgd_pair(HP, lam, skip=head, **_options(path, request))
    reg = opt.reg_params
    planned = _spy_on_plans(monkeypatch, PATHS[path][1])
    for i, (x, y) in enumerate(batches(7)):
        if i == 4:
            CHANGES[change][0](ours, opt, reg)
            CHANGES[change][1](ref, opt_ref, reg_ref)
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg_ref, lam))
        step(ours, opt, x, y)
    assert planned[2:4] == [True, True]  # the plan was in use before the change
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("path", PATHS)
def test_a_new_lambda_reaches_the_planned_step(path, request):
    ref, opt_ref, ours, opt, reg = sgd_pair(HP, 0.7, **_options(path, request))
    for i, (x, y) in enumerate(batches(7)):
        lam = 0.7 if i < 4 else 2.0
        opt.param_groups[0]["reg_lambda"] = lam
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_foreach_plan_is_kept_while_nothing_changes(monkeypatch):
    """The plan is what saves the host time: it must actually be used, step after step, with
    a parameter that never gets a gradient (a frozen layer) and one without an entry (a head)
    in the group."""
    ours = make_mlp()
    ours[0].bias.requires_grad_(False)
    opt = LocalSgd(ours.named_parameters(), reg_params=random_reg_params(ours, skip=("2.bias",)),
                   reg_lambda=0.7, lr=0.05, momentum=0.9, foreach=True)
    planned = _spy_on_plans(monkeypatch, "_planned_foreach_step")
    for x, y in batches(6):
        step(ours, opt, x, y)
    assert planned == [False, False, True, True, True, True]


@pytest.mark.parametrize("entry", [True, False], ids=["penalised", "without-entry"])
@pytest.mark.parametrize("path", PATHS)
def test_a_parameter_unfrozen_under_a_plan_is_stepped(path, entry, request):
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


def _planned_run(monkeypatch, change, n_steps=6, **options):
    ours = make_mlp()
    opt = LocalSgd(ours.named_parameters(), reg_params=random_reg_params(ours), reg_lambda=0.7,
                   lr=0.05, momentum=0.9, foreach=True, **options)
    planned = _spy_on_plans(monkeypatch, "_planned_foreach_step")
    for i, (x, y) in enumerate(batches(n_steps)):
        if i == 3:
            change(opt)
        step(ours, opt, x, y)
    return opt, planned


def test_a_group_switched_off_foreach_leaves_the_foreach_plan(monkeypatch):
    _, planned = _planned_run(monkeypatch, _off_path)
    assert planned[:3] == [False, False, True]
    assert not any(planned[3:])  # the eager step ran, not the kept multi-tensor lists


def test_turning_the_cache_off_frees_the_cached_terms_under_a_plan(monkeypatch):
    opt, planned = _planned_run(monkeypatch, lambda o: setattr(o, "cache_penalty", False))
    assert planned[2] and planned[3] is False
    assert opt._penalty_cache and all(t.slope is None for t in opt._penalty_cache.values())


# ------------------------------------------------------------------ add_mas_penalty's plan

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
    "entry added for a parameter the plan left alone": (
        lambda m, o, r, h: r.__setitem__("2.bias", _bias_entry(m)),
        lambda m, o, r, h: r.__setitem__("2.bias", _bias_entry(m))),
}


def _spy_on_hook_plans(monkeypatch):
    """Per step: whether add_mas_penalty stepped from the plan kept since the last step."""
    from mas_optim.penalty import MasPenalty

    planned = []
    real = MasPenalty._add_penalty

    def spy(self, optimizer, take_over):
        before = self._plans.get(0)
        real(self, optimizer, take_over)
        planned.append(before is not None and self._plans.get(0) is before)

    monkeypatch.setattr(MasPenalty, "_add_penalty", spy)
    return planned


@pytest.mark.parametrize("change", HOOK_CHANGES)
def test_every_change_between_steps_reaches_the_planned_penalty(change, monkeypatch):
    """add_mas_penalty(foreach=True) on AdamW against AdamW on the penalised loss; the last
    layer's bias has no entry (a head's parameter: AdamW steps it alone, and the plan holds)."""
    planned = _spy_on_hook_plans(monkeypatch)
    ref, ours = make_mlp(), make_mlp()
    reg_ref = random_reg_params(ref, skip=("2.bias",))
    reg = copy.deepcopy(reg_ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.05)
    opt = torch.optim.AdamW(ours.named_parameters(), lr=0.01, weight_decay=0.05)
    hook = mas_optim.add_mas_penalty(opt, reg, reg_lambda=0.7, foreach=True)
    lam = 0.7
    for i, (x, y) in enumerate(batches(7)):
        if i == 4:
            HOOK_CHANGES[change][0](ours, opt, reg, hook)
            if HOOK_CHANGES[change][1] is not None:
                HOOK_CHANGES[change][1](ref, opt_ref, reg_ref, None)
            lam = hook.reg_lambda
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg_ref, lam))
        step(ours, opt, x, y)
    assert planned[1:4] == [True, True, True]  # the plan was in use before the change
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


def test_the_planned_penalty_is_still_descended_under_maximize(monkeypatch):
    planned = _spy_on_hook_plans(monkeypatch)
    lam, hp = 0.5, dict(lr=0.01, maximize=True, foreach=True)
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), **hp)
    opt = torch.optim.Adam(ours.named_parameters(), **hp)
    mas_optim.add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, foreach=True)
    for x, y in batches(5):  # ascending task − penalty
        step(ref, opt_ref, x, y, lambda: -autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert planned == [False, True, True, True, True]
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_planned_proximal_step_with_a_head_equals_the_full_step(monkeypatch, kernel_calls):
    """train.py's shape on the CPU: proximal=True (its default), a head without an entry. The
    full step is tested against the proximal map elsewhere (test_kernels.py,
    test_si_proximal.py); the kernel's plan must give the same numbers. (The foreach path plans
    only the explicit step.)"""
    models, used = [], []
    for planned in (True, False):
        m = make_mlp()
        opt = LocalSgd(m.named_parameters(), reg_params=random_reg_params(m, skip=("2.bias",)),
                       reg_lambda=50.0, lr=0.05, momentum=0.9, proximal=True)
        if planned:
            used = _spy_on_plans(monkeypatch, "_planned_kernel_step")
        else:
            monkeypatch.setattr(LocalSgd, "_planned_kernel_step", lambda *args: False)
        for x, y in batches(6):
            step(m, opt, x, y)
        models.append(m)
    assert used == [False, False, True, True, True, True]
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
