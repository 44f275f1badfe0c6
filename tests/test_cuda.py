"""The CUDA paths against their definitions: LocalSgd and add_mas_penalty against the same torch
optimizer on loss + λΣΩ(θ − θ*)² through autograd, compute_omega against the float64
batch-size-1 loop on the CPU. Skipped where torch sees no GPU (CI); run on one before a
release (README, Tests)."""

import copy

import pytest
import torch
from torch import nn

from importance_reference import max_relative_error, reference_omega
from mas_optim import LocalSgd, _kernels, add_mas_penalty, compute_omega
from optim_reference import (SGD_OPTIONS, autograd_penalty, batches, make_mlp, options_id,
                             random_reg_params, step)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_c_kernel_for_cuda_tensors(monkeypatch):
    """The C kernels are for CPU tensors: asking for them on these paths is a bug."""
    monkeypatch.setattr(_kernels, "load", lambda: pytest.fail("C kernels asked for on CUDA"))

SGD_PATHS = {
    "default": {},  # foreach on CUDA, as torch's SGD
    "single-tensor": dict(foreach=False),
    "fused": dict(fused=True),  # no fused step on CUDA: the foreach one (implementation() says)
}


def on_gpu(batch_list):
    return [(x.to(CUDA), y.to(CUDA)) for x, y in batch_list]


def to_gpu(reg):
    return {n: {k: v.to(CUDA) for k, v in e.items()} for n, e in reg.items()}


def assert_same(ref, ours, atol):
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
@pytest.mark.parametrize("path", SGD_PATHS)
def test_local_sgd_on_cuda_matches_the_penalised_loss(hp, path):
    lam = 0.7
    ref, ours = make_mlp().to(CUDA), make_mlp().to(CUDA)
    reg = to_gpu(random_reg_params(make_mlp(), skip=("2.bias",)))
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=copy.deepcopy(reg), reg_lambda=lam,
                   **hp, **SGD_PATHS[path])
    want = "single_tensor" if path == "single-tensor" else "foreach"
    assert [name for name, _ in opt.implementation()] == [want]
    sign = -1.0 if hp.get("maximize") else 1.0
    for x, y in on_gpu(batches(5)):
        step(ref, opt_ref, x, y, lambda: sign * autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert_same(ref, ours, atol=1e-5)


@pytest.mark.parametrize("options", [{}, dict(foreach=False), dict(fused=True)],
                         ids=["foreach", "single-tensor", "fused"])
@pytest.mark.parametrize("penalty_path", [{}, dict(foreach=False)],
                         ids=["default", "single-tensor"])
def test_add_mas_penalty_on_cuda_adamw_matches_the_penalised_loss(options, penalty_path):
    lam, hp = 0.7, dict(lr=0.01, weight_decay=0.05, **options)
    ref, ours = make_mlp().to(CUDA), make_mlp().to(CUDA)
    reg = to_gpu(random_reg_params(make_mlp(), skip=("2.bias",)))
    opt_ref = torch.optim.AdamW(ref.parameters(), **hp)
    opt = torch.optim.AdamW(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam, **penalty_path)
    for x, y in on_gpu(batches(6)):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert_same(ref, ours, atol=1e-5)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 5 * 5, 4))


def test_compute_omega_on_cuda_matches_the_batch_size_one_loop():
    model = small_cnn()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 3, 12, 12, generator=g), torch.zeros(6)) for _ in range(2)]
    want = reference_omega(model, data)
    got = compute_omega(model.to(CUDA), data)
    assert all(o.device.type == "cuda" for o in got.values())
    assert max_relative_error({n: o.cpu() for n, o in got.items()}, want) < 1e-4
