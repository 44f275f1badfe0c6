"""LocalSgd and MasPlugin inside Avalanche 0.6's Naive strategy, with a multi-head model."""

import pytest
import torch
from torch import nn

avalanche = pytest.importorskip("avalanche")

from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark  # noqa: E402
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint  # noqa: E402
from avalanche.models import (IncrementalClassifier, MultiHeadClassifier,  # noqa: E402
                               MultiTaskModule)
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import SupervisedPlugin  # noqa: E402

import mas_optim  # noqa: E402
from mas_optim.avalanche import MasPlugin  # noqa: E402


class Net(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.classifier = MultiHeadClassifier(16, initial_out_features=2)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.shared(x), task_label)


class Tensors(torch.utils.data.TensorDataset):
    @property
    def targets(self):
        return self.tensors[1].tolist()


def benchmark():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 2
    def split(n):
        y = torch.arange(4).repeat_interleave(n)
        return Tensors(centers[y] + 0.5 * torch.randn(len(y), 6, generator=g), y)
    return nc_benchmark(split(24), split(8), n_experiences=2, task_labels=True, seed=0,
                        fixed_class_order=[0, 1, 2, 3], class_ids_from_zero_in_each_exp=True)


class Snapshots(SupervisedPlugin):
    """The weights (after Avalanche adds heads) and Ω at the start of each training experience."""

    def __init__(self, mas):
        super().__init__()
        self.mas = mas
        self.at_start, self.omega = [], []

    def before_training_exp(self, strategy, *args, **kwargs):
        self.at_start.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()})
        self.omega.append({n: e["omega"].clone() for n, e in self.mas.reg_params.items()})


def make_strategy(reg_lambda, optimizer="localsgd", plugin=None):
    torch.manual_seed(0)
    model = Net()
    if optimizer == "localsgd":
        # the proximal step: stable at any λ (the explicit one diverges once 2·lr·λ·Ω > 2)
        opt = mas_optim.LocalSgd(model.named_parameters(), reg_lambda=reg_lambda, lr=0.05,
                                 momentum=0.9, proximal=True)
        plugin = plugin or MasPlugin()
    else:
        opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
        plugin = plugin or MasPlugin(reg_lambda=reg_lambda)
    snaps = Snapshots(plugin)
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                     train_mb_size=8, train_epochs=3, eval_mb_size=16, device="cpu",
                     plugins=[plugin, snaps], evaluator=None)
    return strategy, plugin, snaps


def weighted_drift(omega, before, after):
    """Σ Ω (θ − θ*)² over the shared layers: what the penalty is about."""
    return sum((omega[n] * (after[n] - before[n]).square()).sum().item() for n in omega
               if n.startswith("shared."))


@pytest.mark.parametrize("optimizer", ["localsgd", "adamw"])
def test_new_heads_train_and_the_penalty_holds_the_shared_layers(optimizer):
    bench = benchmark()
    results = {}
    for lam in (0.0, 100.0):
        strategy, plugin, snaps = make_strategy(lam, optimizer)
        for exp in bench.train_stream:
            strategy.train(exp)
        final = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
        results[lam] = (plugin, snaps, final)
    plugin, snaps, final = results[100.0]
    head = "classifier.classifiers.1.classifier.weight"
    assert head not in snaps.at_start[0] and head in snaps.at_start[1]
    # the head Avalanche added for task 1 (unnamed in the optimizer) was trained
    assert (final[head] - snaps.at_start[1][head]).abs().max().item() > 1e-2
    # importance after each experience, the new head included after the second
    assert plugin.reg_params["shared.0.weight"]["omega"].sum().item() > 0
    assert plugin.reg_params[head]["omega"].sum().item() > 0
    # the penalty acts: important shared weights move far less during task 1 than without it
    held = weighted_drift(snaps.omega[1], snaps.at_start[1], final)
    _, free_snaps, free_final = results[0.0]
    free = weighted_drift(free_snaps.omega[1], free_snaps.at_start[1], free_final)
    assert held < 0.05 * free, (held, free)


def test_checkpoint_and_resume_continue_identically(tmp_path):
    """Avalanche's save_checkpoint/maybe_load_checkpoint pickle the whole strategy (with dill),
    optimizer and plugin included; the resumed run must still penalise. (torch's own optimizers
    do not survive dill with torch 2.14 here: "Can't pickle sentinel".)"""
    optimizer = "localsgd"
    bench = benchmark()
    path = tmp_path / "checkpoint.pkl"
    strategy, _, _ = make_strategy(1.0, optimizer)
    strategy.train(bench.train_stream[0])
    save_checkpoint(strategy, str(path))
    strategy.train(bench.train_stream[1])
    want = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}

    fresh, _, _ = make_strategy(1.0, optimizer)
    fresh, start = maybe_load_checkpoint(fresh, str(path))
    assert start == 1
    fresh.train(bench.train_stream[1])
    got = dict(fresh.model.named_parameters())
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # guards the comparison: the same resume without the penalty ends elsewhere
    unpenalised, _, _ = make_strategy(0.0, optimizer)
    unpenalised, _ = maybe_load_checkpoint(unpenalised, str(path))
    plugin = next(p for p in unpenalised.plugins if isinstance(p, MasPlugin))
    plugin.reg_lambda = 0.0
    if optimizer == "localsgd":
        unpenalised.optimizer.param_groups[0]["reg_lambda"] = 0.0
    unpenalised.train(bench.train_stream[1])
    assert not torch.equal(unpenalised.model.shared[0].weight, want["shared.0.weight"])


class GrowingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.classifier = IncrementalClassifier(16, initial_out_features=2)

    def forward(self, x):
        return self.classifier(self.shared(x))


def test_a_growing_head_keeps_the_importance_of_its_old_units():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 2
    def split(n):
        y = torch.arange(4).repeat_interleave(n)
        return Tensors(centers[y] + 0.5 * torch.randn(len(y), 6, generator=g), y)
    bench = nc_benchmark(split(24), split(8), n_experiences=2, task_labels=False, seed=0,
                         fixed_class_order=[0, 1, 2, 3])
    torch.manual_seed(0)
    model = GrowingNet()
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_lambda=1.0, lr=0.05, momentum=0.9,
                             proximal=True)
    plugin = MasPlugin()
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                     train_mb_size=8, train_epochs=2, device="cpu", plugins=[plugin],
                     evaluator=None)
    strategy.train(bench.train_stream[0])
    first = {k: plugin.reg_params["classifier.classifier.weight"][k].clone()
             for k in ("omega", "init_val")}
    assert first["omega"].shape == (2, 16) and first["omega"].sum() > 0
    strategy.train(bench.train_stream[1])  # the head grows to 4 units
    entry = plugin.reg_params["classifier.classifier.weight"]
    assert entry["omega"].shape == (4, 16)
    # Ω of the old units is kept and the second task's importance added to it (Ω only grows)
    assert (entry["omega"][:2] >= first["omega"]).all()
    assert entry["omega"][2:].sum() > 0


def test_omega_of_a_multi_task_model_takes_each_samples_task_label():
    """Ω after experience 0 is Eq. 2 of model(x, t), the float64 batch-size-1 loop, at the
    weights experience 0 ended with (θ*), on that experience's (x, y, t) data."""
    import copy

    from importance_reference import assert_close, reference_omega

    bench = benchmark()
    strategy, plugin, snaps = make_strategy(1.0)
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    omega = snaps.omega[1]  # as the plugin handed it over after experience 0
    model = copy.deepcopy(strategy.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in omega:
                p.copy_(snaps.at_start[1][name])
    data = list(torch.utils.data.DataLoader(bench.train_stream[0].dataset, batch_size=16))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # MultiTaskModule builds its output in the default
    try:
        want = reference_omega(model, data, forward_fn=lambda m, b: m(b[0], b[2]))
    finally:
        torch.set_default_dtype(default)
    assert_close(omega, {n: want[n] for n in omega})
