"""LocalSgd against its definition: torch SGD on loss + λ Σ Ω (θ − θ*)² through autograd."""

import copy

import pytest
import torch
from torch import nn

import mas_optim
from mas_optim import LocalSgd
from mas_optim import functional
from optim_reference import (SGD_OPTIONS, autograd_penalty, batches, make_mlp, options_id,
                             random_reg_params)


def train(pairs, data):
    """A step of cross-entropy for each (model, optimizer) pair on each batch."""
    for x, y in data:
        for model, opt in pairs:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def run_pair(hp, lam=0.7, steps=6, skip=(), sign=1.0, **options):
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref, skip=skip)
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=copy.deepcopy(reg), reg_lambda=lam, **hp,
                   **options)
    for x, y in batches(steps):
        opt_ref.zero_grad()
        task = nn.functional.cross_entropy(ref(x), y)
        # maximize=True ascends the task loss but must still descend the penalty
        (task + sign * autograd_penalty(ref, reg, lam)).backward()
        opt_ref.step()
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        opt.step()
    return ref, ours


@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
def test_matches_torch_sgd_on_penalised_loss(hp):
    ref, ours = run_pair(hp, sign=-1.0 if hp.get("maximize") else 1.0)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert (a - b).abs().max().item() <= 1e-5, n


def test_unregistered_parameters_get_plain_sgd():
    skip = ("2.weight", "2.bias")  # the "head"
    ref, ours = run_pair(dict(lr=0.05, momentum=0.9), skip=skip)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert (a - b).abs().max().item() <= 1e-5


def test_penalty_changes_the_trajectory():
    """Guards the reference itself: with λ > 0 the result differs from plain SGD."""
    plain, ours = make_mlp(), make_mlp()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt = LocalSgd(ours.named_parameters(), reg_params=random_reg_params(ours), reg_lambda=1.0,
                   lr=0.05)
    train([(plain, opt_plain), (ours, opt)], batches(2))
    assert max((a - b).abs().max().item()
               for a, b in zip(plain.parameters(), ours.parameters())) > 1e-3


def test_large_parameters_are_updated_slice_by_slice(monkeypatch):
    """The single-tensor step cuts large CPU tensors into cache-sized slices."""
    monkeypatch.setattr(functional, "_CHUNK", 7)  # forces many slices on every tensor
    monkeypatch.setattr(functional, "_SLICE_ABOVE", 7)
    for hp in (dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
               dict(lr=0.05)):
        ref, ours = run_pair(hp, fused=False)
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert (a - b).abs().max().item() <= 1e-5


def test_step_accepts_reg_params_positionally_as_the_original_code():
    model = make_mlp()
    reg = random_reg_params(model)
    ref = make_mlp()
    opt_ref = LocalSgd(ref.named_parameters(), reg_params=reg, reg_lambda=0.5, lr=0.1)
    opt = LocalSgd(model.named_parameters(), reg_lambda=0.5, lr=0.1)  # no reg_params yet
    x, y = batches(1)[0]
    for m, o, arg in ((ref, opt_ref, None), (model, opt, reg)):
        nn.functional.cross_entropy(m(x), y).backward()
        o.step(arg) if arg is not None else o.step()
    assert opt.reg_params is reg
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_step_with_closure_returns_loss_and_steps():
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    x, y = batches(1)[0]
    opt_ref = LocalSgd(ref.named_parameters(), reg_params=reg, reg_lambda=0.5, lr=0.1)
    nn.functional.cross_entropy(ref(x), y).backward()
    opt_ref.step()
    opt = LocalSgd(ours.named_parameters(), reg_params=reg, reg_lambda=0.5, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ours(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_state_dict_restores_the_penalty_and_continues_identically():
    hp = dict(lr=0.05, momentum=0.9)
    a, b = make_mlp(), make_mlp()
    reg = random_reg_params(a)
    opt_a = LocalSgd(a.named_parameters(), reg_params=reg, reg_lambda=0.3, **hp)
    data = batches(6)
    train([(a, opt_a)], data[:3])
    b.load_state_dict(a.state_dict())
    sd = copy.deepcopy(opt_a.state_dict())
    assert sd["param_groups"][0]["reg_lambda"] == 0.3
    assert {"momentum_buffer", "mas_omega", "mas_init_val"} <= set(sd["state"][0])
    opt_b = LocalSgd(b.named_parameters(), reg_lambda=0.0, lr=1.0)  # no reg_params: restored
    opt_b.load_state_dict(sd)
    assert set(opt_b.reg_params) == set(reg)
    assert opt_b.param_groups[0]["reg_lambda"] == 0.3 and opt_b.param_groups[0]["lr"] == 0.05
    train([(a, opt_a), (b, opt_b)], data[3:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_learning_rate():
    model = make_mlp()
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    lrs = []
    for x, y in batches(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_penalty_value():
    model = make_mlp()
    reg = random_reg_params(model, skip=("2.bias",))
    opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=0.25)
    expected = autograd_penalty(model, reg, 0.25)
    assert opt.penalty().item() == pytest.approx(expected.item(), rel=1e-6)
    assert not opt.penalty().requires_grad
    assert LocalSgd(model.named_parameters()).penalty().item() == 0.0


def test_penalty_alone_steps_by_exactly_two_lambda_omega():
    """With a zero task gradient one plain step is θ − lr·2λΩ(θ − θ*): the factor 2 of the
    penalty's gradient is checked, not just that the penalty shrank."""
    model = make_mlp()
    reg = random_reg_params(model)
    lr, lam = 0.1, 0.5
    opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=lam, lr=lr)
    want = {n: p.detach() - lr * 2 * lam * reg[n]["omega"] * (p.detach() - reg[n]["init_val"])
            for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1), "Invalid learning rate: -1"),
    (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
    (dict(reg_lambda=-0.1), "Invalid reg_lambda value: -0.1"),
    (dict(reg_lambda=float("nan")), "Invalid reg_lambda value: nan"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalSgd(make_mlp().named_parameters(), **kwargs)


def test_unnamed_parameters_get_torch_sgd():
    hp = dict(lr=0.05, momentum=0.9)
    ref, ours = make_mlp(), make_mlp()
    opt = LocalSgd(ours.parameters(), reg_lambda=1.0, **hp)
    train([(ref, torch.optim.SGD(ref.parameters(), **hp)), (ours, opt)], batches(3))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_reg_params_for_an_unnamed_optimizer_are_refused():
    model = make_mlp()
    with pytest.raises(ValueError, match="parameters have no names"):
        LocalSgd(model.parameters(), reg_params=random_reg_params(model))


def test_reg_params_that_match_no_parameter_are_refused():
    model = make_mlp()
    reg = {"backbone." + n: e for n, e in random_reg_params(model).items()}
    with pytest.raises(ValueError, match="no name in reg_params matches.*differ by a prefix"):
        LocalSgd(model.named_parameters(), reg_params=reg)


def test_reg_params_of_another_adapter_name_the_adapter_mismatch():
    model = nn.ModuleDict({"lora_A": nn.ModuleDict({"task_b": nn.Linear(3, 2)})})
    reg = {n.replace("task_b", "default"): {"omega": torch.ones_like(p),
                                            "init_val": p.detach().clone()}
           for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="differ only by adapter name: 'default' in reg_params, "
                                         "'task_b' in the parameters"):
        LocalSgd(model.named_parameters(), reg_params=reg)


def test_reg_params_of_wrong_shape_are_refused():
    model = make_mlp()
    reg = random_reg_params(model)
    reg["0.weight"]["omega"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"reg_params\['0.weight'\]\['omega'\]"):
        LocalSgd(model.named_parameters(), reg_params=reg)


def test_param_groups_of_named_parameters():
    model = make_mlp()
    groups = [{"params": list(model[0].named_parameters(prefix="0")), "lr": 0.1},
              {"params": list(model[2].named_parameters(prefix="2")), "lr": 0.01,
               "reg_lambda": 0.0}]
    opt = LocalSgd(groups, reg_params=random_reg_params(model), reg_lambda=0.5)
    assert [g["reg_lambda"] for g in opt.param_groups] == [0.5, 0.0]
    with pytest.raises(ValueError, match="Invalid reg_lambda value: -1"):
        LocalSgd([{"params": list(model.named_parameters()), "reg_lambda": -1}])


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = LocalSgd(emb.named_parameters(), reg_params=mas_optim.init_reg_params(emb))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_zero_omega_equals_plain_sgd():
    """Ω = 0 is how every first task starts: it must not perturb the SGD result (beyond
    rounding: LocalSgd forms g + μb in one op, torch rounds μb before adding g)."""
    for hp in (dict(lr=0.05, momentum=0.9), dict(lr=0.05)):
        ref, ours = make_mlp(), make_mlp()
        opt_ref = torch.optim.SGD(ref.parameters(), **hp)
        opt = LocalSgd(ours.named_parameters(), reg_params=mas_optim.init_reg_params(ours),
                       reg_lambda=1.0, **hp)
        train([(ref, opt_ref), (ours, opt)], batches(4))
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert (a - b).abs().max().item() <= 1e-6


def test_changes_to_reg_params_and_lambda_are_seen_by_the_next_step():
    """LocalSgd caches 2λΩ and 2λΩθ*: an in-place consolidation, a new reg_params dict and a
    new λ must all reach the next step."""
    hp = dict(lr=0.05, momentum=0.9)
    ref, ours = make_mlp(), make_mlp()
    reg_ref = random_reg_params(ref)
    reg = copy.deepcopy(reg_ref)
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=reg, reg_lambda=0.5, **hp)
    lam = 0.5
    for i, (x, y) in enumerate(batches(6)):
        if i == 2:  # in place, as consolidate_reg_params does
            omega = {n: torch.rand_like(p) for n, p in ours.named_parameters()}
            mas_optim.consolidate_reg_params(reg, ours, omega)
            mas_optim.consolidate_reg_params(reg_ref, ref, omega)
        if i == 3:  # a whole new dict
            reg_ref = random_reg_params(ref, seed=9)
            opt.reg_params = copy.deepcopy(reg_ref)
        if i == 4:
            lam = opt.param_groups[0]["reg_lambda"] = 2.0
        opt_ref.zero_grad()
        (nn.functional.cross_entropy(ref(x), y) + autograd_penalty(ref, reg_ref, lam)).backward()
        opt_ref.step()
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        opt.step()
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert (a - b).abs().max().item() <= 1e-5, i


def test_swapped_in_mid_training_from_torch_sgd_state():
    """Drop-in: a torch.optim.SGD state dict (momentum buffers) loads into LocalSgd, which then
    continues exactly as SGD would while Ω is still zero."""
    hp = dict(lr=0.05, momentum=0.9)
    ref, ours = make_mlp(), make_mlp()
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    data = batches(5)
    train([(ref, opt_ref)], data[:2])
    ours.load_state_dict(ref.state_dict())
    opt = LocalSgd(ours.named_parameters(), reg_params=mas_optim.init_reg_params(ours),
                   reg_lambda=0.3, lr=1.0)
    with pytest.warns(UserWarning, match=r"carries no Ω/θ\*.*keeping this optimizer's"):
        opt.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
    assert opt.param_groups[0]["reg_lambda"] == 0.3 and opt.param_groups[0]["lr"] == 0.05
    train([(ref, opt_ref), (ours, opt)], data[2:])
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert (a - b).abs().max().item() <= 1e-6


def test_add_param_group_takes_its_own_lambda():
    model = make_mlp()
    opt = LocalSgd(list(model[0].named_parameters(prefix="0")), reg_lambda=0.5)
    opt.add_param_group({"params": list(model[2].named_parameters(prefix="2")),
                         "reg_lambda": 2.0})
    assert [g["reg_lambda"] for g in opt.param_groups] == [0.5, 2.0]
