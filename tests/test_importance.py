"""compute_omega and OmegaSgd against paper Eq. 2 computed one sample at a time by autograd."""

import pytest
import torch
from torch import nn

import mas_optim
from mas_optim import OmegaSgd, compute_omega
from mas_optim import importance as importance_module


def reference_omega(model, xs, per_sample=True, batch_size=None):
    """Eq. 2 literally: mean over samples of |d ||F(x_k)||^2 / d theta|, batch size 1.
    With per_sample=False: the batch formula, (1/N) sum_b |d sum_{k in b} ||F(x_k)||^2 / d theta|."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    was_training = model.training
    model.eval()
    step = 1 if per_sample else batch_size
    for i in range(0, len(xs), step):
        out = model(xs[i:i + step])
        grads = torch.autograd.grad(out.pow(2).sum(), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                acc[n] += g.abs().double()
    model.train(was_training)
    return {n: (a / len(xs)).float() for n, a in acc.items()}


def assert_close(got, want, rel=1e-4):
    assert set(got) == set(want)
    for n in want:
        scale = want[n].abs().max().item()
        assert scale > 0, f"{n}: reference is all zero, the test would prove nothing"
        err = (got[n] - want[n]).abs().max().item() / scale
        assert err <= rel, f"{n}: relative error {err:.2e}"


def loader(xs, batch_size, with_labels=True):
    for i in range(0, len(xs), batch_size):
        x = xs[i:i + batch_size]
        yield (x, torch.zeros(len(x), dtype=torch.long)) if with_labels else x


class SharedTwice(nn.Module):
    """Applies the same Linear twice: its per-sample gradient sums over both calls."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Sequence(nn.Module):
    """A Linear applied to every position of a sequence: (B, T, in) inputs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(inplace=True), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, stride=2, dilation=1, padding=2, groups=2), nn.ReLU(),
        nn.Conv2d(8, 4, 2, dilation=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5))


def cnn_bn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 3 * 3, 6),
        nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))


def warm_up_batchnorm(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 1)  # running statistics that differ from a batch's own


CASES = {
    "mlp": (mlp, (10,)),
    "cnn": (cnn, (3, 6, 6)),
    "cnn_bn": (cnn_bn, (3, 6, 6)),
    "shared_twice": (SharedTwice, (6,)),
    "sequence": (Sequence, (4, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_matches_batch_size_one_reference(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make()
    xs = torch.randn(23, *shape)
    warm_up_batchnorm(model, xs)
    model.train()  # compute_omega must switch to eval by itself
    got = compute_omega(model, loader(xs, 8))
    assert model.training
    assert_close(got, reference_omega(model, xs))


@pytest.mark.parametrize("case", ["mlp", "cnn", "cnn_bn"])
def test_batch_formula_matches_the_original_formula(case):
    make, shape = CASES[case]
    torch.manual_seed(1)
    model = make()
    xs = torch.randn(20, *shape)
    warm_up_batchnorm(model, xs)
    got = compute_omega(model, loader(xs, 8), per_sample=False)
    want = reference_omega(model, xs, per_sample=False, batch_size=8)
    assert_close(got, want)
    exact = reference_omega(model, xs)
    assert any((got[n] - exact[n]).abs().max() > 1e-3 * exact[n].abs().max() for n in exact), \
        "the batch formula should differ from Eq. 2 on this data"


def test_per_sample_conv_in_small_chunks(monkeypatch):
    monkeypatch.setattr(importance_module, "_PER_SAMPLE_BUDGET", 1)  # one sample at a time
    torch.manual_seed(2)
    model, xs = cnn(), torch.randn(9, 3, 6, 6)
    assert_close(compute_omega(model, loader(xs, 4)), reference_omega(model, xs))


def test_loader_of_bare_tensors_and_frozen_layers():
    torch.manual_seed(3)
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    xs = torch.randn(11, 10)
    got = compute_omega(model, loader(xs, 4, with_labels=False))
    assert set(got) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    assert_close(got, reference_omega(model, xs))


def test_model_state_is_left_as_it_was():
    torch.manual_seed(4)
    model = cnn_bn()
    xs = torch.randn(10, 3, 6, 6)
    model.train()
    model[1].eval()  # a mixed-mode model stays mixed
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[n] = p.grad.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_omega(model, loader(xs, 4))
    compute_omega(model, loader(xs, 4), per_sample=False)
    assert model.training and not model[1].training and model[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BatchNorm buffers
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_empty_loader_and_bad_inputs_are_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="no samples"):
        compute_omega(model, [])
    with pytest.raises(TypeError, match="loader must yield"):
        compute_omega(model, [("not a tensor", 1)])
    with pytest.raises(ValueError, match="Invalid method"):
        compute_omega(model, [], method="nope")


def test_omega_sgd_with_single_samples_is_eq_2():
    torch.manual_seed(5)
    model = cnn()
    xs = torch.randn(12, 3, 6, 6)
    model.eval()
    opt = OmegaSgd(model.named_parameters())
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(len(xs)):
        opt.zero_grad()
        model(xs[i:i + 1]).pow(2).sum().backward()
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q), "OmegaSgd must never change a parameter"
    assert_close(opt.omega(), reference_omega(model, xs))


def test_omega_sgd_with_batches_is_the_batch_formula():
    torch.manual_seed(6)
    model = mlp()
    xs = torch.randn(20, 10)
    opt = OmegaSgd(model.named_parameters())
    for i in range(0, 20, 8):
        opt.zero_grad()
        x = xs[i:i + 8]
        model(x).pow(2).sum().backward()
        opt.step(num_samples=len(x))
    assert_close(opt.omega(), reference_omega(model, xs, per_sample=False, batch_size=8))
    with pytest.raises(ValueError, match="Invalid num_samples value: 0"):
        opt.step(num_samples=0)
    with pytest.raises(ValueError, match="named_parameters"):
        OmegaSgd(model.parameters())


def test_omega_feeds_consolidation_and_penalty():
    torch.manual_seed(7)
    model = mlp()
    reg = mas_optim.init_reg_params(model)
    omega = compute_omega(model, loader(torch.randn(8, 10), 4))
    mas_optim.consolidate_reg_params(reg, model, omega)
    for n in reg:
        assert torch.equal(reg[n]["omega"], omega[n])


# ---------------------------------------------------------------- local (Hebbian) MAS

def hebbian_reference(model, xs):
    """l-MAS by hand: for every Linear/Conv2d, Ω_ij = (2/N) Σ_k Σ_positions |z_i| |a_j|, with a the
    layer's input and z its output, looping over samples and output positions."""
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o: acts.setdefault(m, []).append((i[0], o.clone())))
             for m in model.modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d)
                                             and not isinstance(m.padding, str))]
    model.eval()
    with torch.no_grad():
        for x in xs:
            model(x[None])
    for h in hooks:
        h.remove()
    names = {id(p): n for n, p in model.named_parameters()}
    ref = {}
    for m, records in acts.items():
        w = torch.zeros_like(m.weight, dtype=torch.float64)
        b = torch.zeros(m.weight.shape[0], dtype=torch.float64)
        for a, z in records:
            a, z = a[0].double().abs(), z[0].double().abs()
            if isinstance(m, nn.Linear):
                w += 2 * torch.outer(z, a)
                b += 2 * z
                continue
            (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
            a = nn.functional.pad(a, (pw, pw, ph, ph))
            cin_g, cout_g = a.shape[0] // m.groups, z.shape[0] // m.groups
            for o in range(z.shape[0]):
                g = o // cout_g
                for y in range(z.shape[1]):
                    for xx in range(z.shape[2]):
                        patch = a[g * cin_g:(g + 1) * cin_g,
                                  y * sh:y * sh + dh * (kh - 1) + 1:dh,
                                  xx * sw:xx * sw + dw * (kw - 1) + 1:dw]
                        w[o] += 2 * z[o, y, xx] * patch
                        b[o] += 2 * z[o, y, xx]
        ref[names[id(m.weight)]] = (w / len(xs)).float()
        if m.bias is not None:
            ref[names[id(m.bias)]] = (b / len(xs)).float()
    return ref


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_local_mas_matches_hand_written_hebbian_rule(case):
    make, shape = CASES[case]
    torch.manual_seed(8)
    model = make()
    xs = torch.randn(9, *shape)
    assert_close(compute_omega(model, loader(xs, 4), method="local"), hebbian_reference(model, xs))


def test_local_mas_of_a_linear_layer_is_eq_2_on_the_layer_itself():
    """For one Linear layer F_l, l-MAS is exactly Eq. 2 with F = F_l: per-sample autograd."""
    torch.manual_seed(9)
    layer = nn.Linear(6, 4)
    xs = torch.randn(10, 6)
    assert_close(compute_omega(layer, loader(xs, 3), method="local"), reference_omega(layer, xs))


def test_local_mas_gives_other_parameters_their_global_omega():
    torch.manual_seed(10)
    model = cnn_bn()
    xs = torch.randn(7, 3, 6, 6)
    warm_up_batchnorm(model, xs)
    got = compute_omega(model, loader(xs, 4), method="local")
    want = reference_omega(model, xs)
    bn = {n: got[n] for n in ("1.weight", "1.bias", "7.weight", "7.bias", "4.weight", "4.bias")}
    assert_close(bn, {n: want[n] for n in bn})  # BatchNorm, and the padding="same" conv
    assert_close({"0.weight": got["0.weight"]}, {"0.weight": hebbian_reference(model, xs)["0.weight"]})
