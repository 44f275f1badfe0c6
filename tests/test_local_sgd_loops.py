"""LocalSgd in other people's training loops: no silent skips, copies and checkpoints that keep
penalising, state dicts that cannot switch the penalty off, one validation for every door."""

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mas_optim
from mas_optim import LocalSgd
from optim_reference import (IMPLEMENTATIONS, SGD_OPTIONS, autograd_penalty, batches,
                             implementation_options, options_id, random_reg_params, sgd_pair,
                             step)
from optim_reference import make_mlp as make_model


def assert_same(a, b, atol=1e-6):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=n)


# ------------------------------------------------------------------ every parameter is updated

def test_parameters_appended_without_names_are_trained_like_sgd():
    """As Avalanche's dynamic optimizer (and a loop that extends a group) adds a new head."""
    lam, hp = 0.7, dict(lr=0.05, momentum=0.9)
    ref, ours = make_model(), make_model()
    reg = random_reg_params(ref, skip=("2.weight", "2.bias"))
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(list(ours[0].named_parameters(prefix="0")), reg_params=copy.deepcopy(reg),
                   reg_lambda=lam, **hp)
    opt.param_groups[0]["params"].extend(ours[2].parameters())
    head_before = ours[2].weight.detach().clone()
    for x, y in batches(4):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert not torch.equal(ours[2].weight, head_before)
    assert_same(ref, ours)


def test_add_param_group_without_names_gets_sgd():
    hp = dict(lr=0.05, momentum=0.9)
    ref, ours = make_model(), make_model()
    reg = random_reg_params(ref, skip=("2.weight", "2.bias"))
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(list(ours[0].named_parameters(prefix="0")), reg_params=copy.deepcopy(reg),
                   reg_lambda=0.7, **hp)
    opt.add_param_group({"params": ours[2].parameters()})
    for x, y in batches(4):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, 0.7))
        step(ours, opt, x, y)
    assert_same(ref, ours)
    assert opt.param_groups[1]["param_names"] == [None, None]


def test_a_parameter_that_changed_shape_is_named_in_the_error():
    """A growing head (Avalanche's IncrementalClassifier) replaces its parameter in place."""
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model), lr=0.1)
    model[2].weight = nn.Parameter(torch.zeros(5, 16))
    opt.param_groups[0]["params"][2] = model[2].weight
    model[2].weight.grad = torch.ones(5, 16)
    with pytest.raises(ValueError, match=r"reg_params\['2.weight'\]\['omega'\] is \(3, 16\).*"
                                         r"the parameter is \(5, 16\).*changed shape"):
        opt.step()


def test_parameters_removed_without_their_names_are_an_error():
    model = make_model()
    opt = LocalSgd(model.named_parameters(), lr=0.1)
    opt.param_groups[0]["params"].pop(0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="4 param_names for 3 params"):
        opt.step()


# ------------------------------------------------------------------ copies keep penalising

def pickle_round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


def torch_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("copier", [pickle_round_trip, copy.deepcopy, torch_round_trip],
                         ids=["pickle", "deepcopy", "torch.save"])
def test_a_copy_with_its_model_keeps_penalising(copier):
    lam = 0.7
    ref, opt_ref, ours, opt, reg = sgd_pair(dict(lr=0.05, momentum=0.9), lam,
                                            track_path_integral=True)
    data = batches(6)
    for x, y in data[:3]:
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    copied = copier({"model": ours, "opt": opt})
    model2, opt2 = copied["model"], copied["opt"]
    assert opt2.track_path_integral and set(opt2.reg_params) == set(reg)
    assert opt2.penalty().item() == pytest.approx(opt.penalty().item(), rel=1e-6)
    for x, y in data[3:]:
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(model2, opt2, x, y)
    assert_same(ref, model2)


def test_the_optimizer_alone_round_trips_through_pickle():
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model),
                   reg_lambda=0.5, lr=0.1)
    clone = pickle_round_trip(opt)
    assert clone.penalty().item() == pytest.approx(opt.penalty().item(), rel=1e-6)
    assert clone.param_groups[0]["reg_lambda"] == 0.5


def test_an_older_pickled_state_gets_the_missing_attributes():
    """What torch's own __getstate__ kept (defaults, state, param_groups) still unpickles."""
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_lambda=0.5, lr=0.1)
    old = torch.optim.Optimizer.__getstate__(opt)
    for group in old["param_groups"]:
        del group["proximal"]
    clone = LocalSgd.__new__(LocalSgd)
    clone.__setstate__(copy.deepcopy(old))
    assert clone.reg_params == {} and clone.track_path_integral is False
    assert clone.param_groups[0]["proximal"] is False
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()


# ------------------------------------------------------------------ load_state_dict

def test_state_dict_saved_under_ddp_names_keeps_the_optimizers_names():
    model = make_model()
    reg = random_reg_params(model)
    opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=1.0, lr=0.1)
    before = opt.penalty().item()
    ddp_like = LocalSgd([("module." + n, p) for n, p in make_model().named_parameters()],
                        reg_lambda=1.0, lr=0.1)
    with pytest.warns(UserWarning, match="carries no"):
        opt.load_state_dict(ddp_like.state_dict())
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert before > 0 and opt.penalty().item() == before


def test_state_dict_of_other_parameters_is_refused():
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model), lr=0.1)
    other = LocalSgd([("backbone." + n, p) for n, p in make_model().named_parameters()])
    with pytest.raises(ValueError, match=r"names parameter 0 of param group 0 'backbone.0.weight'"
                                         r", this optimizer names it '0.weight'"):
        opt.load_state_dict(other.state_dict())


def test_plain_sgd_state_dict_keeps_per_group_lambda_and_proximal():
    model = make_model()
    groups = [{"params": list(model[0].named_parameters(prefix="0")), "reg_lambda": 2.0,
               "proximal": True},
              {"params": list(model[2].named_parameters(prefix="2")), "reg_lambda": 0.0}]
    opt = LocalSgd(groups, reg_params=random_reg_params(model), lr=0.1)
    sgd = torch.optim.SGD([{"params": list(model[0].parameters())},
                           {"params": list(model[2].parameters())}], lr=0.3)
    with pytest.warns(UserWarning, match="carries no"):
        opt.load_state_dict(sgd.state_dict())
    assert [g["reg_lambda"] for g in opt.param_groups] == [2.0, 0.0]
    assert [g["proximal"] for g in opt.param_groups] == [True, False]
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]


# ------------------------------------------------------------------ validation, every door

def nan_omega(model):
    reg = random_reg_params(model)
    reg["0.bias"]["omega"][3] = float("nan")
    return reg


@pytest.mark.parametrize("door", ["constructor", "setter", "step"])
def test_nan_omega_is_refused_at_every_door(door):
    model = make_model()
    with pytest.raises(ValueError, match=r"reg_params\['0.bias'\]\['omega'\] holds NaN or Inf"):
        if door == "constructor":
            LocalSgd(model.named_parameters(), reg_params=nan_omega(model))
        opt = LocalSgd(model.named_parameters())
        if door == "setter":
            opt.reg_params = nan_omega(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(nan_omega(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    (lambda e: e.__setitem__("omega", torch.zeros(3)), r"\['omega'\] is \(3,\)"),
    (lambda e: e["init_val"].fill_(float("inf")), r"\['init_val'\] holds NaN or Inf"),
    (lambda e: e["omega"].fill_(-1.0), r"\['omega'\] holds negative values"),
    (lambda e: e.__setitem__("omega", torch.zeros(16, dtype=torch.float64)),
     r"\['omega'\] is \(16,\) torch.float64"),
])
@pytest.mark.parametrize("steps_before", [0, 3], ids=["first-step", "later-step"])
def test_an_entry_changed_after_construction_is_refused_at_the_step(change, message,
                                                                    steps_before):
    """Also after some steps (the C kernel path then steps from a plan of what it found)."""
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model), lr=0.1,
                   momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(steps_before):
        opt.step()
    change(opt.reg_params["0.bias"])
    with pytest.raises(ValueError, match=r"reg_params\['0.bias'\]" + message):
        opt.step()


def test_a_stray_lambda_entry_is_named_with_the_reg_lambda_hint():
    model = make_model()
    reg = random_reg_params(model)
    reg["lambda"] = 1.0  # the original code's way of passing λ
    with pytest.raises(TypeError, match=r"reg_params\['lambda'\] is a float.*reg_lambda="):
        LocalSgd(model.named_parameters(), reg_params=reg)


@pytest.mark.parametrize("lam", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1,
                                 np.int64(1)], ids=["np.float32", "np.float64", "0-dim", "int",
                                                    "np.int64"])
def test_any_real_scalar_is_a_reg_lambda(lam):
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_lambda=lam)
    assert type(opt.param_groups[0]["reg_lambda"]) is float
    assert opt.param_groups[0]["reg_lambda"] == float(lam)


@pytest.mark.parametrize("lam, message", [
    ("0.1", "'0.1' is a string; convert it with float"),
    (torch.tensor([0.1]), "a tensor of shape \\(1,\\)"),
    (True, "Invalid reg_lambda value: True"),
    (float("inf"), "Invalid reg_lambda value: inf"),
])
def test_non_scalars_and_strings_are_not_a_reg_lambda(lam, message):
    with pytest.raises(ValueError, match=message):
        LocalSgd(make_model().named_parameters(), reg_lambda=lam)


def test_freeze_layers_as_one_string_is_one_name():
    model = make_model()
    reg = mas_optim.init_reg_params(model, freeze_layers="2.weight")
    assert set(reg) == {"0.weight", "0.bias", "2.bias"}


# ------------------------------------------------------------------ implementations

def run_against_reference(hp, lam=0.7, **options):
    ref, opt_ref, ours, opt, reg = sgd_pair(hp, lam, skip=("2.bias",), **options)
    sign = -1.0 if hp.get("maximize") else 1.0
    for x, y in batches(5):
        step(ref, opt_ref, x, y, lambda: sign * autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert_same(ref, ours, atol=1e-5)
    return opt


@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_matches_the_penalised_loss(hp, impl):
    opt = run_against_reference(hp, **implementation_options(impl))
    assert [name for name, _ in opt.implementation()] == [impl]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_gradient_is_the_task_gradient_after_a_step(impl):
    """LocalSgd never writes .grad, on every implementation (the SI path integral reads it)."""
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    _, _, ours, opt, _ = sgd_pair(hp, 0.7, **implementation_options(impl))
    for x, y in batches(2):
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        task = [p.grad.clone() for p in ours.parameters()]
        opt.step()
        for p, g in zip(ours.parameters(), task):
            assert torch.equal(p.grad, g)


def test_without_the_c_kernel_the_default_is_single_tensor_and_says_why(monkeypatch):
    """Without a C compiler the default is the single-tensor step, and implementation() says
    why; asking for fused=True then warns once."""
    from mas_optim import _kernels

    monkeypatch.setattr(_kernels, "load", lambda: None)
    monkeypatch.setattr(_kernels, "reason", lambda: "no C compiler (cc) on PATH")
    opt = LocalSgd(make_model().named_parameters())
    assert opt.implementation() == [("single_tensor",
                                     "no C kernel on this machine: no C compiler (cc) on PATH")]
    with pytest.warns(RuntimeWarning, match="fused=True: no C kernel.*single_tensor step"):
        run_against_reference(dict(lr=0.05, momentum=0.9), fused=True)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(differentiable=True), ValueError, "does not support differentiable=True"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True`"),
])
def test_options_torch_refuses_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        LocalSgd(make_model().named_parameters(), **kwargs)


def test_a_large_omega_on_the_explicit_step_warns_once_and_names_proximal():
    model = make_model()
    reg = random_reg_params(model)  # max Ω ≈ 2: 2·lr·λ·max Ω ≈ 2·0.1·10·2 = 4 > 2
    opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=10.0, lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"2·lr·λ·max Ω = [\d.]+ > 2.*proximal=True") as rec:
        for x, y in batches(3):
            step(model, opt, x, y)
    assert len([w for w in rec if "proximal=True" in str(w.message)]) == 1


@pytest.mark.parametrize("proximal, lam", [(True, 10.0), (False, 0.1)],
                         ids=["proximal", "small-step"])
def test_a_stable_step_does_not_warn(proximal, lam):
    model = make_model()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model),
                   reg_lambda=lam, lr=0.1, proximal=proximal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(2):
            step(model, opt, x, y)


def test_torch_distributed_checkpoint_round_trip_restores_the_penalty(tmp_path):
    """DCP loads into the state dict of the optimizer it restores: that optimizer needs entries
    of the right shapes (init_reg_params) for DCP to fill in."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    hp = dict(lr=0.05, momentum=0.9)
    a, b = make_model(), make_model()
    reg = random_reg_params(a)
    opt_a = LocalSgd(a.named_parameters(), reg_params=copy.deepcopy(reg), reg_lambda=0.3, **hp)
    data = batches(5)
    for x, y in data[:2]:
        step(a, opt_a, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.save({"optim": get_optimizer_state_dict(a, opt_a)}, checkpoint_id=str(tmp_path))
        b.load_state_dict(a.state_dict())
        opt_b = LocalSgd(b.named_parameters(), reg_params=mas_optim.init_reg_params(b),
                         reg_lambda=0.0, **hp)
        template = {"optim": get_optimizer_state_dict(b, opt_b)}
        dcp.load(template, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(b, opt_b, template["optim"])
    assert opt_b.param_groups[0]["reg_lambda"] == 0.3
    for x, y in data[2:]:
        step(a, opt_a, x, y)
        step(b, opt_b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_reloading_a_state_dict_with_no_reg_params_on_either_side_is_silent(recwarn):
    # what accelerate's AcceleratedOptimizer does once before the first task is consolidated
    opt = LocalSgd(make_model().named_parameters(), reg_lambda=1.0, lr=0.1)
    opt.load_state_dict(opt.state_dict())
    assert not [w for w in recwarn if "carries no" in str(w.message)]
    assert opt.reg_params == {}
