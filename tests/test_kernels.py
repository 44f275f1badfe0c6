"""LocalSgd's one-pass C kernel (mas_optim/csrc/mas_kernels.c): the same numbers as the formula in
float64, every tensor it can't take stepped another correct way, the build cached safely,
and a machine without a compiler served by the single-tensor step without a word. Under CI
(CI=true) these tests fail where the kernel cannot build, instead of skipping."""

import copy
import os
import shutil
import signal
import stat
import warnings

import pytest
import torch
from torch import nn

from mas_optim import LocalSgd, _kernels, add_mas_penalty
from optim_reference import (SGD_OPTIONS, autograd_penalty, batches, make_mlp, options_id,
                             random_reg_params, require_fused, step)

# Slices of a large tensor run on several threads from this many elements each (mas_kernels.c).
PER_THREAD = 1 << 16


@pytest.fixture
def fused():
    """The kernel, built here: a skip elsewhere, a failure under CI (CI=true)."""
    require_fused()
    return _kernels.load()


def test_the_kernel_builds_here(fused):
    """Under CI this fails where the kernel cannot build (every other kernel test would skip)."""
    assert fused is not None
    assert LocalSgd(make_mlp().named_parameters()).implementation()[0][0] == "fused"


def run_pair(make_opt_ref, make_opt, n_steps=5, dtype=torch.float32, penalty_sign=1.0,
             lam=0.7, skip=("2.bias",)):
    ref, ours = make_mlp().to(dtype), make_mlp().to(dtype)
    reg = {n: {k: v.to(dtype) for k, v in e.items()}
           for n, e in random_reg_params(ref, skip=skip).items()}
    opt_ref, opt = make_opt_ref(ref), make_opt(ours, copy.deepcopy(reg), lam)
    for x, y in batches(n_steps):
        x = x.to(dtype)
        step(ref, opt_ref, x, y, lambda: penalty_sign * autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    return ref, ours, opt


@pytest.mark.parametrize("proximal", [False, True], ids=["explicit", "proximal"])
@pytest.mark.parametrize("hp", SGD_OPTIONS, ids=options_id)
def test_float64_local_sgd_kernel_equals_the_formula_to_double_precision(hp, proximal, fused):
    """Explicit: SGD on the penalised loss (autograd); proximal: SGD on the task loss, then
    θ ← θ* + (θ − θ*) / (1 + 2·lr·λ·Ω)."""
    lam = 0.7
    ref, ours = make_mlp().double(), make_mlp().double()
    reg = {n: {k: v.double() for k, v in e.items()}
           for n, e in random_reg_params(ref, skip=("2.bias",)).items()}
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=copy.deepcopy(reg), reg_lambda=lam,
                   proximal=proximal, **hp)
    sign = -1.0 if hp.get("maximize") else 1.0
    for x, y in batches(5):
        x = x.double()
        if proximal:
            step(ref, opt_ref, x, y)
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if n in reg:
                        o, a = reg[n]["omega"], reg[n]["init_val"]
                        p.copy_(a + (p - a) / (1 + 2 * hp["lr"] * lam * o))
        else:
            step(ref, opt_ref, x, y, lambda: sign * autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    assert opt.implementation()[0][0] == "fused"
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


def _with_penalty(opt, reg, lam, **options):
    add_mas_penalty(opt, reg, reg_lambda=lam, **options)
    return opt


@pytest.mark.parametrize("cls, hp", [
    (torch.optim.LBFGS, dict(lr=0.5, max_iter=4, history_size=3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.AdamW, dict(lr=0.01)),
], ids=["lbfgs", "sgd", "adamw"])
def test_step_with_closure_penalises_inside_the_closure(cls, hp):
    """The closure computes the gradient inside step(), after the pre-hook: the penalty must
    go into it (and into the loss LBFGS's line search compares)."""
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    opt_ref = cls(ref.parameters(), **hp)
    opt = cls(ours.named_parameters(), **hp)
    add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam)
    losses = []
    for x, y in batches(3):
        def closure_ref():
            opt_ref.zero_grad()
            loss = nn.functional.cross_entropy(ref(x), y) + autograd_penalty(ref, reg, lam)
            loss.backward()
            return loss

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ours(x), y)
            loss.backward()
            return loss

        losses.append((opt_ref.step(closure_ref).item(), opt.step(closure).item()))
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for want, got in losses:
        assert got == pytest.approx(want, rel=1e-6)


def test_tensors_the_kernel_cannot_take_are_stepped_exactly(fused):
    """A transposed (non-contiguous) weight and a θ* that is the parameter itself: both still
    get the exact update, by the single-tensor step."""
    lam, hp = 0.7, dict(lr=0.05, momentum=0.9)
    ref, ours = make_mlp(), make_mlp()
    for m in (ref, ours):
        m[0].weight = nn.Parameter(m[0].weight.detach().t().contiguous().t())
    assert not ours[0].weight.is_contiguous()
    reg = random_reg_params(ref)
    reg_ours = copy.deepcopy(reg)
    reg_ours["2.weight"]["init_val"] = ours[2].weight  # θ* moves with θ: no penalty
    reg["2.weight"]["omega"] = torch.zeros_like(reg["2.weight"]["omega"])
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=reg_ours, reg_lambda=lam, **hp)
    for x, y in batches(4):
        step(ref, opt_ref, x, y, lambda: autograd_penalty(ref, reg, lam))
        step(ours, opt, x, y)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


def test_two_threads_give_exactly_what_one_gives(fused):
    """A tensor above the threading threshold is cut into slices run at once."""
    big = 2 * 2 * PER_THREAD + 5

    def run(threads):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(big // 5, 5, bias=False))
        reg = random_reg_params(model)
        opt = LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=0.7, lr=0.05,
                       momentum=0.9)
        before = torch.get_num_threads()
        g = torch.Generator().manual_seed(1)
        try:
            for _ in range(3):
                torch.set_num_threads(1)  # the same gradients in both runs
                opt.zero_grad()
                model(torch.randn(4, big // 5, generator=g)).square().sum().backward()
                torch.set_num_threads(threads)
                opt.step()
        finally:
            torch.set_num_threads(before)
        return model[0].weight.detach()

    assert torch.equal(run(1), run(2))


class Vectors(nn.Module):
    """One parameter per length: below, at and past a block of the kernels' loops, and long
    enough for the lines they prefetch ahead."""

    LENGTHS = (1, 63, 64, 65, 127, 200, 321, 1000, 4099)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList(nn.Parameter(torch.randn(n, dtype=torch.float64))
                                  for n in self.LENGTHS)
        self.x = [torch.randn(n, dtype=torch.float64) for n in self.LENGTHS]

    def loss(self):
        return sum((w * x).sin().sum() for w, x in zip(self.w, self.x))


def test_every_tensor_length_is_stepped_exactly(fused):
    lam, hp = 0.7, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    ref, ours = Vectors(), Vectors()
    g = torch.Generator().manual_seed(1)
    reg = {n: {"omega": torch.rand(p.shape, generator=g, dtype=p.dtype),
               "init_val": p.detach() + torch.randn(p.shape, generator=g, dtype=p.dtype)}
           for n, p in ref.named_parameters()}
    opt_ref = torch.optim.SGD(ref.parameters(), **hp)
    opt = LocalSgd(ours.named_parameters(), reg_params=reg, reg_lambda=lam, **hp)
    for _ in range(4):
        for model, o, extra in ((ref, opt_ref, True), (ours, opt, False)):
            o.zero_grad()
            loss = model.loss() + (autograd_penalty(model, reg, lam) if extra else 0)
            loss.backward()
            o.step()
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


def test_unknown_flags_are_refused_not_ignored(fused):
    kernels = fused
    t = [torch.zeros(4) for _ in range(5)]
    rows = [[x.data_ptr()] for x in t] + [[4], [128]]
    with pytest.raises(RuntimeError, match="unknown flags"):
        kernels.sgd(torch.float32, rows, (0.1, 0.0, 0.0, 0.0, 1.0, 1.0))


def test_fits_refuses_aliases_other_dtypes_and_strides():
    a, b = torch.zeros(6), torch.zeros(6)
    assert _kernels.fits(a, b)
    assert not _kernels.fits(a, a)
    buf = torch.zeros(10)
    assert not _kernels.fits(buf[:6], buf[4:])  # overlapping views of one buffer
    assert _kernels.fits(buf[:5], buf[5:])
    assert not _kernels.fits(a, b.double())
    assert not _kernels.fits(a.bfloat16(), b.bfloat16())
    assert not _kernels.fits(torch.zeros(3, 2).t(), torch.zeros(2, 3))


# ------------------------------------------------------------------ build and cache

@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache folder; load() forgets what this process built."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MAS_OPTIM_CACHE_DIR", str(cache))
    _kernels._loaded.cache_clear()
    yield cache
    _kernels._loaded.cache_clear()


def test_library_is_built_once_into_a_private_cache_and_reused(fresh_build):
    kernels = _kernels.load()
    assert kernels is not None, _kernels.reason()
    assert kernels.path.parent == fresh_build
    assert stat.S_IMODE(fresh_build.stat().st_mode) & 0o077 == 0
    built = kernels.path.stat().st_mtime_ns
    _kernels._loaded.cache_clear()
    assert _kernels.load().path == kernels.path
    assert kernels.path.stat().st_mtime_ns == built


def test_damaged_library_in_the_cache_is_rebuilt_not_loaded(fresh_build):
    """As after a crash or a full disk in another process (this one never loaded it)."""
    fresh_build.mkdir(mode=0o700)
    path = fresh_build / _kernels._library_name(shutil.which(os.environ.get("CC") or "cc"),
                                                _kernels._variants()[0])
    path.write_bytes(b"\x7fELF not really")
    path.chmod(0o700)
    kernels = _kernels.load()
    assert kernels is not None and kernels.path == path
    assert path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 1000


def test_cache_others_can_write_is_not_trusted(fresh_build):
    fresh_build.mkdir(mode=0o700)
    os.chmod(fresh_build, 0o777)
    kernels = _kernels.load()
    assert kernels is not None
    assert kernels.path.parent != fresh_build
    assert not list(fresh_build.iterdir())
    assert not kernels.path.parent.exists()  # the private build folder is not left behind


def test_without_a_compiler_the_default_step_is_single_tensor_and_silent(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    assert _kernels.load() is None
    assert "no C compiler" in _kernels.reason()
    hp = dict(lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, ours, _ = run_pair(
            lambda m: torch.optim.SGD(m.parameters(), **hp),
            lambda m, reg, lam: LocalSgd(m.named_parameters(), reg_params=reg, reg_lambda=lam,
                                         **hp))
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_compiler_that_fails_is_named_in_the_reason(fresh_build, monkeypatch):
    fake = fresh_build.parent / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc: error: out of disk' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert _kernels.load() is None
    assert "fake-cc: error: out of disk" in _kernels.reason()


def test_another_cpu_type_sharing_the_cache_gets_its_own_library(monkeypatch):
    """-march=native builds for this CPU: a home folder shared by a cluster's nodes must not
    hand one node's instructions to another."""
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        pytest.skip("no C compiler")
    flags = _kernels._variants()[0]
    assert _kernels._NATIVE in flags
    here = _kernels._library_name(cc, flags)
    real = _kernels._run
    monkeypatch.setattr(_kernels, "_run", lambda cmd: real(cmd) + (
        "#define __AVX512F__ 1\n" if "-dM" in cmd else ""))
    assert _kernels._library_name(cc, flags) != here


def test_a_compiler_without_march_native_still_builds_the_kernels(fresh_build, monkeypatch):
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        pytest.skip("no C compiler")
    fake = fresh_build.parent / "old-cc"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -march=native ] && "
                    "{ echo 'old-cc: unknown -march=native' >&2; exit 1; }; done\n"
                    f"exec {cc} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    kernels = _kernels.load()
    assert kernels is not None, _kernels.reason()
    assert kernels.path.parent == fresh_build


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_threaded_slices_still_run_in_a_forked_child(fused):
    """A forked process (multiprocessing's fork) has none of the parent's OpenMP threads: the
    kernel must not wait on them."""
    big = 2 * 2 * PER_THREAD
    model = nn.Linear(big // 4, 4, bias=False)
    opt = LocalSgd(model.named_parameters(), reg_params=random_reg_params(model),
                   reg_lambda=0.7, lr=0.05)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model(torch.randn(2, big // 4)).sum().backward()
        opt.step()  # the parent starts its threads
        pid = os.fork()
        if pid == 0:  # the child: step again, exit 0 if it returns
            signal.alarm(20)
            opt.step()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(before)
    assert os.waitstatus_to_exitcode(status) == 0


def test_slices_run_on_torchs_own_openmp_team_where_torch_uses_libgomp():
    """Two OpenMP runtimes in one process would each keep threads spinning for cores."""
    if not _kernels._torch_gnu_openmp():
        pytest.skip("torch does not run on its own libgomp.so.1 here")
    kernels = _kernels.load()
    assert kernels is not None and kernels.openmp
    assert _kernels._gnu_openmp() == [os.path.join(os.path.dirname(torch.__file__), "lib",
                                                    "libgomp.so.1")]


def test_penalty_under_grad_scaler_and_lr_schedule_equals_the_penalised_loss():
    """GradScaler unscales before step() (the hook sees true gradients) and a scheduler
    changes lr between steps (the kernel reads it at each step)."""
    lam = 0.7
    ref, ours = make_mlp(), make_mlp()
    reg = random_reg_params(ref)
    runs = []
    for model, penalised in ((ref, True), (ours, False)):
        opt = torch.optim.AdamW(model.named_parameters(), lr=0.01, weight_decay=0.05)
        if not penalised:
            add_mas_penalty(opt, copy.deepcopy(reg), reg_lambda=lam)
        runs.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
                     torch.amp.GradScaler("cpu", init_scale=1024.0), penalised))
    for x, y in batches(6):
        for model, opt, schedule, scaler, penalised in runs:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if penalised:
                loss = loss + autograd_penalty(model, reg, lam)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            schedule.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
