"""compute_omega and OmegaSgd against paper Eq. 2 computed one sample at a time by autograd."""

import pytest
import torch
from torch import nn

from importance_reference import assert_close
from importance_reference import reference_omega as float64_reference
from mas_optim import OmegaSgd, compute_omega
from mas_optim.importance import omega_sums
from mas_optim.importance import base


def reference_omega(model, xs, per_sample=True, batch_size=None):
    """Eq. 2 by a float64 batch-size-1 loop (per_sample=False: the batch formula over batches
    of batch_size), on the samples xs."""
    step = 1 if per_sample else batch_size
    return float64_reference(model, [xs[i:i + step] for i in range(0, len(xs), step)],
                             per_sample=per_sample)


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
    monkeypatch.setattr(base, "BUDGET", 1)  # one sample at a time
    monkeypatch.setattr(base, "CPU_TILE", 1)
    torch.manual_seed(2)
    model, xs = cnn(), torch.randn(9, 3, 6, 6)
    assert_close(compute_omega(model, loader(xs, 4)), reference_omega(model, xs))


def test_loader_of_bare_tensors():
    torch.manual_seed(3)
    model = mlp()
    xs = torch.randn(11, 10)
    assert_close(compute_omega(model, loader(xs, 4, with_labels=False)), reference_omega(model, xs))


def test_frozen_parameters_get_no_omega():
    torch.manual_seed(3)
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    got = compute_omega(model, loader(torch.randn(11, 10), 4))
    assert set(got) == {"2.weight", "2.bias", "4.weight", "4.bias"}


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


def test_empty_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="no samples"):
        compute_omega(mlp(), [])


def test_batch_without_a_tensor_is_a_clear_error():
    with pytest.raises(TypeError, match="loader must yield"):
        compute_omega(mlp(), [("not a tensor", 1)])


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="Invalid method"):
        compute_omega(mlp(), [], method="nope")


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


def test_omega_sgd_refuses_a_non_positive_sample_count():
    opt = OmegaSgd(mlp().named_parameters())
    with pytest.raises(ValueError, match="Invalid num_samples value: 0"):
        opt.step(num_samples=0)


def test_omega_sgd_needs_parameter_names():
    with pytest.raises(ValueError, match="named_parameters"):
        OmegaSgd(mlp().parameters())


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


# ---------------------------------------------------------------- inputs, outputs, dtypes

class DictModel(nn.Module):
    """Hugging Face style: called with the batch as keyword arguments, returns a dict."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return {"logits": self.out(h.sum(1)), "hidden": h}


def dict_batches():
    g = torch.Generator().manual_seed(0)
    for n in (4, 3):
        ids = torch.randint(0, 12, (n, 6), generator=g)
        mask = (torch.rand(n, 6, generator=g) > 0.3).float()
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(n, dtype=torch.long)}


def test_dict_batches_are_keyword_arguments_and_logits_are_the_output():
    torch.manual_seed(0)
    model = DictModel()
    assert_close(compute_omega(model, dict_batches()), float64_reference(model, dict_batches()))


def test_output_fn_picks_the_output_to_regularise():
    torch.manual_seed(0)
    model = DictModel()
    pick = lambda out: out["hidden"]  # noqa: E731
    got = compute_omega(model, dict_batches(), output_fn=pick)
    want = float64_reference(model, dict_batches(), output_fn=pick)
    assert_close({"emb.weight": got["emb.weight"]}, {"emb.weight": want["emb.weight"]})
    assert not got["out.weight"].any()  # the head does not reach "hidden"


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y, y.tanh()


def test_a_tuple_output_needs_output_fn():
    with pytest.raises(TypeError, match="output_fn="):
        compute_omega(TwoOutputs(), [torch.randn(3, 4)])


def test_output_fn_may_return_several_tensors_whose_squared_norms_add():
    torch.manual_seed(0)
    model, xs = TwoOutputs(), torch.randn(5, 4)
    both = lambda out: out  # noqa: E731
    assert_close(compute_omega(model, [xs[:3], xs[3:]], output_fn=both),
                 float64_reference(model, [xs[:3], xs[3:]], output_fn=both))


class TaskConditioned(nn.Module):
    """forward(x, task_labels), as Avalanche's MultiTaskModule: a head per task."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 2), nn.Linear(6, 2)])

    def forward(self, x, task_labels):
        h = self.body(x).relu()
        every_head = torch.stack([head(h) for head in self.heads], 1)   # (B, tasks, 2)
        return every_head[torch.arange(len(x)), task_labels]


def test_forward_fn_passes_task_labels():
    torch.manual_seed(0)
    model = TaskConditioned()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=g), torch.zeros(5), torch.tensor([0, 1, 1, 0, 1]))]
    with_task = lambda m, b: m(b[0], b[2])  # noqa: E731
    assert_close(compute_omega(model, batches, forward_fn=with_task),
                 float64_reference(model, batches, forward_fn=with_task))


def test_avalanche_multitask_module_with_forward_fn():
    models = pytest.importorskip("avalanche.models")
    torch.manual_seed(0)
    model = models.MTSimpleMLP(input_size=6, hidden_size=8)
    for t in (0, 1):
        model.classifier.adaptation(type("Exp", (), {"classes_in_this_experience": [0, 1, 2],
                                          "task_labels": [t]})())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=g), torch.zeros(4), torch.tensor([0, 0, 1, 1]))]
    with_task = lambda m, b: m(b[0], b[2])  # noqa: E731
    # heads run on the samples of their task only: not one module call per batch, so
    # MultiHeadClassifier is differentiated per sample (vmap cannot split by task: one warning)
    with pytest.warns(RuntimeWarning, match="cannot run MultiHeadClassifier"):
        got = compute_omega(model, batches, forward_fn=with_task)
    # MultiTaskModule builds its output in the default dtype: a float32 reference loop
    assert_close(got, float64_reference(model, batches, forward_fn=with_task, dtype=torch.float32))


def test_float64_model_is_computed_in_float64():
    torch.manual_seed(0)
    model = cnn_bn().double()
    xs = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    warm_up_batchnorm(model, xs)
    got = compute_omega(model, loader(xs, 4))
    assert all(v.dtype == torch.float64 for v in got.values())
    assert_close(got, reference_omega(model, xs), rel=1e-10)


@pytest.mark.parametrize("per_sample,method", [(False, "global"), (True, "local")])
def test_dict_batches_work_for_the_batch_formula_and_local_mas(per_sample, method):
    torch.manual_seed(0)
    model = DictModel()
    got = compute_omega(model, dict_batches(), per_sample=per_sample, method=method)
    if method == "global":
        want = float64_reference(model, dict_batches(), per_sample=False)
        assert_close(got, want)
    else:  # the embedding has no Hebbian rule: its global Ω
        want = float64_reference(model, dict_batches())
        assert_close({"emb.weight": got["emb.weight"]}, {"emb.weight": want["emb.weight"]})


def test_omega_sums_are_compute_omega_times_the_sample_count():
    torch.manual_seed(0)
    model = mlp()
    xs = torch.randn(9, 10)
    sums, count = omega_sums(model, loader(xs, 4))
    omega = compute_omega(model, loader(xs, 4))
    assert count == 9
    for n in omega:
        assert torch.allclose(sums[n] / count, omega[n], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- never silently wrong

class BatchStatistics(nn.Module):
    """BatchNorm without running statistics normalises by the batch even in eval mode: the
    samples of a batch interact, so no batched shortcut is exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)  # a bias before BatchNorm has no gradient
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.out = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        return self.out(self.bn(self.conv(x)).flatten(1))


def test_samples_that_interact_get_each_sample_alone():
    torch.manual_seed(0)
    model = BatchStatistics()
    xs = torch.randn(6, 2, 4, 4)
    assert_close(compute_omega(model, loader(xs, 3)), reference_omega(model, xs))


class DataDependent(nn.Module):
    """A layer whose forward reads a value out of its input (.item()): vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale * (2.0 if x.sum().item() > 0 else 1.0)


def test_a_module_vmap_cannot_run_is_looped_over_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), DataDependent(), nn.Linear(4, 2))
    xs = torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="cannot run DataDependent") as record:
        got = compute_omega(model, loader(xs, 3))
    assert len([w for w in record if "compute_omega" in str(w.message)]) == 1
    assert "\n" not in str(record[0].message)
    assert_close(got, reference_omega(model, xs))


def test_local_mas_global_omega_reaches_a_layer_whose_output_is_rewritten_in_place():
    """BatchNorm between a Hebbian conv and ReLU(inplace=True): nothing below it is
    differentiated for l-MAS, and its output tensor is overwritten, yet it gets Eq. 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    xs = torch.randn(6, 3, 6, 6)
    warm_up_batchnorm(model, xs)
    got = compute_omega(model, loader(xs, 3), method="local")
    want = reference_omega(model, xs)
    assert_close({n: got[n] for n in ("1.weight", "1.bias")},
                 {n: want[n] for n in ("1.weight", "1.bias")})


def test_the_sample_dimension_is_proven_once_per_batch_signature():
    """The probe (a second forward on two of the samples) runs for the first batch of each
    signature only: three batches of 4, then a last batch of 3."""
    torch.manual_seed(0)
    model = mlp()
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    xs = torch.randn(15, 10)
    got = compute_omega(model, loader(xs, 4))
    assert forwards == [4, 2, 4, 4, 3, 2]  # batch, probe, batch, batch, new size: batch, probe
    assert_close(got, reference_omega(model, xs))


class Unhashable:
    """A value in a batch that cannot be hashed (defines __eq__ without __hash__)."""

    def __eq__(self, other):
        return isinstance(other, Unhashable)

    __hash__ = None


def test_a_batch_holding_an_unhashable_value_is_proven_on_its_own():
    torch.manual_seed(0)
    model = mlp()
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    xs = torch.randn(8, 10)
    batches = [(xs[:4], Unhashable()), (xs[4:], Unhashable())]
    got = compute_omega(model, batches)
    assert forwards == [4, 2, 4, 2]  # each batch: its forward, then its probe
    assert_close(got, reference_omega(model, xs))
