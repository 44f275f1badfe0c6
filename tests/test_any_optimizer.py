"""add_mas_penalty against its definition: the same optimizer on loss + λΣΩ(θ − θ*)² through
autograd."""

import copy
import warnings

import pytest
import torch

import mas_optim
from mas_optim import add_mas_penalty
from optim_reference import autograd_penalty, batches, make_mlp, random_reg_params, step

OPTIMIZERS = [
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, amsgrad=True, foreach=False)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    (torch.optim.Adagrad, dict(lr=0.05)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
]


PATHS = {"kernel": {}, "eager": dict(fused=False), "foreach": dict(foreach=True)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("cls, hp", OPTIMIZERS,
                         ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(OPTIMIZERS)])
def test_equals_the_optimizer_on_the_penalised_loss(cls, hp, cache, path, kernel_calls):
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref, skip=("2.bias",))
    opt_ref = cls(ref.parameters(), **hp)
    opt = cls(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, cache_penalty=cache,
                    **PATHS[path])
    for x, y in batches(6):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    # On the kernel path, Adam and AdamW (without amsgrad) run in one pass with the penalty;
    # every other optimizer gets the penalty kernel, then its own step.
    whole_step = path == "kernel" and cls in (torch.optim.Adam, torch.optim.AdamW) \
        and not hp.get("amsgrad")
    assert bool(kernel_calls["adam"]) == whole_step
    assert bool(kernel_calls["penalty"]) == (path == "kernel" and not whole_step)


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


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_maximize_still_descends_the_penalty(cache):
    lam, hp = 0.5, dict(lr=0.01, maximize=True)
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), **hp)
    opt = torch.optim.Adam(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, cache_penalty=cache)
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


def test_state_dict_is_the_optimizers_own_and_resumes_identically():
    lam = 0.7
    a, b = make_mlp(), make_mlp()
    reg = random_reg_params(a)
    opt_a = torch.optim.AdamW(a.named_parameters(), lr=0.01)
    add_mas_penalty(opt_a, reg, reg_lambda=lam)
    data = batches(6)
    for x, y in data[:3]:
        step(a, opt_a, x, y)
    sd = copy.deepcopy(opt_a.state_dict())
    plain_keys = torch.optim.AdamW(make_mlp().named_parameters(), lr=0.01).state_dict()
    assert sd["param_groups"][0].keys() == plain_keys["param_groups"][0].keys()
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.named_parameters(), lr=0.01)
    opt_b.load_state_dict(sd)
    add_mas_penalty(opt_b, reg, reg_lambda=lam)
    for x, y in data[3:]:
        step(a, opt_a, x, y)
        step(b, opt_b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


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


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_proximal_for_sgd_is_the_step_then_the_exact_proximal_map(momentum):
    lr, lam = 0.1, 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    opt = torch.optim.SGD(ours.named_parameters(), lr=lr, momentum=momentum)
    add_mas_penalty(opt, reg, reg_lambda=lam, proximal=True)
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


def test_compiled_penalty_traces_as_one_graph_and_equals_the_penalised_loss(monkeypatch,
                                                                             no_c_kernels):
    """``fused=True`` where the C kernel is not available (off the CPU, say): fullgraph=True
    captures the penalty whole. aot_eager runs that graph without generating code, which
    keeps this test fast."""
    real_compile = torch.compile

    def aot_eager(fn, **kwargs):
        return real_compile(fn, **dict(kwargs, backend="aot_eager"))

    monkeypatch.setattr(torch, "compile", aot_eager)
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01)
    opt = torch.optim.AdamW(ours.named_parameters(), lr=0.01)
    mas = add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        for x, y in batches(4):
            step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
            step(ours, opt, x, y)
    assert mas._fused_kernel not in (None, False)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fused_penalty_falls_back_with_one_warning(monkeypatch, no_c_kernels):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("Compiler: g++ not found")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(ours.named_parameters(), lr=0.01)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, fused=True)
    with pytest.warns(RuntimeWarning, match="could not build the fused penalty.*g\\+\\+") as rec:
        for x, y in batches(3):
            step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
            step(ours, opt, x, y)
    assert len(rec) == 1
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
