"""mas_optim.stability_decay / select_reg_lambda against De Lange et al.'s protocol (TPAMI 2021,
Algorithm 1): A* with λ = 0, then λ = start, start·α, ... until the validation score (accuracy,
or the likelihood exp(−mean cross-entropy)) >= (1 − p)·A*."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mas_optim

EPOCHS = 8


def test_decay_stops_at_the_first_lambda_within_the_margin():
    accuracy = {0.0: 90.0, 8.0: 50.0, 4.0: 71.0, 2.0: 72.0, 1.0: 85.0}
    calls = []

    def validation_accuracy(reg_lambda):
        calls.append(reg_lambda)
        return accuracy[reg_lambda]

    chosen = mas_optim.stability_decay(validation_accuracy, start=8.0, margin=0.2, factor=0.5)
    assert calls == [0.0, 8.0, 4.0, 2.0]  # 72 >= 0.8 * 90: stop, 1.0 never trained
    assert chosen.reg_lambda == 2.0 and chosen.within_margin
    assert chosen.reference == 90.0 and chosen.threshold == pytest.approx(72.0)
    assert chosen.tries == [(0.0, 90.0), (8.0, 50.0), (4.0, 71.0), (2.0, 72.0)]


def test_decay_accepts_the_start_when_it_is_within_the_margin():
    chosen = mas_optim.stability_decay(lambda lam: 100.0 - lam, start=10.0, margin=0.1)
    assert chosen.reg_lambda == 10.0 and len(chosen.tries) == 2


def test_decay_keeps_the_smallest_lambda_tried_when_none_is_within_the_margin():
    calls = []

    def validation_accuracy(reg_lambda):
        calls.append(reg_lambda)
        return 100.0 if reg_lambda == 0 else 10.0

    chosen = mas_optim.stability_decay(validation_accuracy, start=1.0, factor=0.5, max_tries=3)
    assert calls == [0.0, 1.0, 0.5, 0.25]
    assert chosen.reg_lambda == 0.25 and not chosen.within_margin


@pytest.mark.parametrize("kwargs, message", [
    (dict(start=0.0), "start must be a finite number > 0"),
    (dict(start=float("inf")), "start must be a finite number > 0"),
    (dict(start=1.0, margin=1.0), "margin must be in [0, 1)"),
    (dict(start=1.0, margin=-0.1), "margin must be in [0, 1)"),
    (dict(start=1.0, factor=1.0), "factor must be in (0, 1)"),
    (dict(start=1.0, max_tries=0), "max_tries must be a positive integer"),
])
def test_bad_settings_are_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError) as err:
        mas_optim.stability_decay(lambda lam: 1.0, **kwargs)
    assert message in str(err.value)


def _toy():
    """A 2-layer net, its reg_params after an 'old task' (Ω from compute_omega), a new task
    whose labels the old weights do not give, and a validation split of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x_old = torch.randn(32, 4)
    reg_params = mas_optim.init_reg_params(model)
    omega = mas_optim.compute_omega(model, [(x_old, None)])
    reg_params = mas_optim.consolidate_reg_params(reg_params, model, omega)
    x = torch.randn(48, 4)
    y = (x[:, 0] * x[:, 1] > 0).long()
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    return model, reg_params, train, [(x[32:], y[32:])]


def _reference_score(model, reg_params, train, val, reg_lambda, epochs, measure):
    """The protocol's 'train with λ from the current model, measure on validation', written
    out: SGD on loss + λ Σ Ω (θ − θ*)² through autograd, on a copy; the accuracy, or the
    likelihood as the formula says (the mean probability of the correct class, geometric)."""
    net = copy.deepcopy(model).double()
    omega = {n: e["omega"].double() for n, e in reg_params.items()}
    star = {n: e["init_val"].double() for n, e in reg_params.items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            loss = F.cross_entropy(net(x.double()), y) + reg_lambda * sum(
                (omega[n] * (p - star[n]) ** 2).sum() for n, p in net.named_parameters())
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = net(val[0][0].double())
    if measure == "accuracy":
        return 100.0 * float((logits.argmax(1) == val[0][1]).float().mean())
    p_correct = torch.softmax(logits, 1).gather(1, val[0][1][:, None]).nan_to_num(0.0)
    return 100.0 * float(p_correct.prod() ** (1.0 / len(p_correct)))


@pytest.mark.parametrize("measure", ["likelihood", "accuracy"])
def test_select_reg_lambda_follows_the_protocol_on_a_toy_model(measure):
    model, reg_params, train, val = _toy()
    before = {n: p.clone() for n, p in model.state_dict().items()}

    def make_optimizer(net, reg_lambda):
        return mas_optim.LocalSgd(net.named_parameters(), reg_params=reg_params,
                                  reg_lambda=reg_lambda, lr=0.5)

    chosen = mas_optim.select_reg_lambda(model, train, val, make_optimizer, epochs=EPOCHS,
                                         start=64.0, margin=0.2, factor=0.5, max_tries=10,
                                         measure=measure)
    expected = [(lam, _reference_score(model, reg_params, train, val, lam, EPOCHS, measure))
                for lam, _ in chosen.tries]
    assert [lam for lam, _ in chosen.tries] == [0.0] + [64.0 * 0.5 ** k
                                                       for k in range(len(chosen.tries) - 1)]
    assert [acc for _, acc in chosen.tries] == pytest.approx([acc for _, acc in expected])
    a_star = expected[0][1]
    accepted = [lam for lam, acc in expected[1:] if acc >= 0.8 * a_star]
    assert len(chosen.tries) > 2  # the toy needs the decay: the start is too stiff
    assert chosen.reg_lambda == accepted[0] == chosen.tries[-1][0]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_select_reg_lambda_refuses_a_bad_epoch_count():
    model, reg_params, train, val = _toy()
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        mas_optim.select_reg_lambda(model, train, val, lambda net, lam: None, epochs=0,
                                    start=1.0)


def test_select_reg_lambda_refuses_an_unknown_measure():
    model, reg_params, train, val = _toy()
    with pytest.raises(ValueError, match="measure must be one of likelihood, accuracy"):
        mas_optim.select_reg_lambda(model, train, val, None, start=1.0, measure="loss")


def test_validation_scores_restore_the_models_mode():
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5))
    model.train()
    scores = mas_optim.selection.validation_scores(
        model, [(torch.randn(8, 4), torch.randint(0, 2, (8,)))])
    assert model.training and 0 < scores["likelihood"] < 100 and 0 <= scores["accuracy"] <= 100
