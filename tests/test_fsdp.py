"""MAS under FSDP2 (fully_shard): 2 gloo processes on loopback against one process.

The two ranks run every scenario in one process group (tests/fsdp_worker.py); the tests compare
what they wrote with references computed here in one process on the unsharded model.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mas_optim
from helpers import run_ranks
from fsdp_worker import (HOSTILE, LR, MOMENTUM, OMEGA_KWARGS, OPTIMIZERS, REG_LAMBDA,
                         make_model, omega_batches, start_reg_params, train_batches, train_with)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")

WORKER = Path(__file__).with_name("fsdp_worker.py")
WORLD = 2
TIMEOUT_S = 240  # the ranks take about 30 s on 2 busy cores; a hang is killed after this


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_inputs(out: Path) -> None:
    """The files the ranks load: one written by one process, and broken ones."""
    reg = start_reg_params(make_model())
    mas_optim.save_reg_params(reg, out / "one_process.pickle")
    raw = (out / "one_process.pickle").read_bytes()
    (out / "hostile.pickle").write_bytes(pickle.dumps(Evil()))
    (out / "truncated.pickle").write_bytes(raw[:len(raw) // 2])
    (out / "empty.pickle").write_bytes(b"")
    wrong = {n: {k: t[:1].clone() for k, t in e.items()} for n, e in reg.items()}
    mas_optim.save_reg_params(wrong, out / "wrong_shape.pickle")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    write_inputs(out)
    reports = run_ranks(WORKER, out, WORLD, TIMEOUT_S)
    return out, reports


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def one_process_training():
    """The same steps as the ranks, in one process on whole batches (fully_shard averages the
    two half-batch mean gradients, which is the whole batch's mean gradient)."""
    model = make_model()
    model.eval()
    reg = start_reg_params(make_model())
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_params=reg, reg_lambda=REG_LAMBDA,
                             lr=LR, momentum=MOMENTUM)
    for x, y in train_batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    penalty = float(opt.penalty())
    omega = mas_optim.compute_omega(model, omega_batches(0, 1))
    mas_optim.consolidate_reg_params(reg, model, omega)
    return model, reg, penalty


@pytest.mark.parametrize("label", list(OMEGA_KWARGS))
def test_omega_over_two_sharded_ranks_equals_one_process(ranks, label):
    out, reports = ranks
    want = mas_optim.compute_omega(make_model(), omega_batches(0, 1), **OMEGA_KWARGS[label])
    got = torch.load(out / f"omega_{label}.pt")
    assert got.keys() == want.keys()
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-5, (label, n, rel_err(got[n], want[n]))
    for report in reports:  # each rank kept only its slice, placed like the parameter
        placed = report[f"omega_{label}_placed"]
        assert placed and all(placed.values()), placed


def test_omega_under_hsdp_equals_one_process(ranks):
    out, reports = ranks
    want = mas_optim.compute_omega(make_model(), omega_batches(0, 1))
    got = torch.load(out / "omega_hybrid.pt")
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-5, (n, rel_err(got[n], want[n]))
    for report in reports:
        assert report["omega_hybrid_placed"] and all(report["omega_hybrid_placed"].values())


def test_omega_with_a_rank_without_data_equals_one_process(ranks):
    out, _ = ranks
    want = mas_optim.compute_omega(make_model(), omega_batches(0, 1))
    got = torch.load(out / "omega_one_rank_empty.pt")
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-5, (n, rel_err(got[n], want[n]))


def test_local_sgd_with_penalty_on_sharded_model_matches_one_process(ranks):
    out, _ = ranks
    model, _, _ = one_process_training()
    got = torch.load(out / "weights.pt")
    start = dict(make_model().named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(p, start[n]), n  # the steps did move every parameter
        assert rel_err(got[n], p.detach()) <= 1e-5, (n, rel_err(got[n], p.detach()))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_penalised_optimizer_on_sharded_model_matches_one_process(ranks, kind):
    out, _ = ranks
    want = train_with(kind, make_model(), rank=0)   # one process, whole batches
    got = torch.load(out / f"{kind}.pt")
    start = dict(make_model().named_parameters())
    for n, p in want.items():
        assert not torch.equal(p, start[n].detach()), n
        assert rel_err(got[n], p) <= 1e-5, (kind, n, rel_err(got[n], p))


def test_omega_and_anchor_after_sharded_task_match_one_process(ranks):
    out, _ = ranks
    _, want, _ = one_process_training()
    got = torch.load(out / "full_reg.pt")
    for n in want:
        for k in ("omega", "init_val"):
            assert rel_err(got[n][k], want[n][k]) <= 1e-5, (n, k, rel_err(got[n][k], want[n][k]))


def test_init_reg_params_on_sharded_model_is_placed_like_parameters(ranks):
    for report in ranks[1]:
        assert report["init_placed"] and all(report["init_placed"].values()), report
        assert report["init_values"]  # θ* = this rank's slice of θ, Ω = 0


def test_consolidate_on_sharded_model_keeps_reg_params_placed_like_parameters(ranks):
    for report in ranks[1]:
        assert report["consolidated_placed"] and all(report["consolidated_placed"].values())


def test_file_written_by_two_ranks_loads_in_one_process_with_identical_omega(ranks):
    out, _ = ranks
    held = torch.load(out / "full_reg.pt")       # what the two ranks held, gathered
    loaded = mas_optim.load_reg_params(out / "two_ranks.pickle", model=make_model())
    assert loaded.keys() == held.keys()
    for n in held:
        for k in ("omega", "init_val"):
            assert not mas_optim.sharded.is_sharded(loaded[n][k])
            assert torch.equal(loaded[n][k], held[n][k]), (n, k)


def test_file_written_by_one_process_gives_each_rank_its_slice(ranks):
    out, reports = ranks
    full = mas_optim.load_reg_params(out / "one_process.pickle")
    for r, report in enumerate(reports):
        assert report["loaded_placed"] and all(report["loaded_placed"].values())
        slices = torch.load(out / f"loaded_{r}.pt")
        for n, entry in full.items():
            for k, t in entry.items():
                # fully_shard's Shard(0): rank r holds chunk r of the first dimension
                assert torch.equal(slices[n][k], t.chunk(WORLD, dim=0)[r]), (r, n, k)


def test_file_written_by_two_ranks_reloads_into_two_ranks_unchanged(ranks):
    assert all(report["reloaded_equal"] for report in ranks[1])


@pytest.mark.parametrize("name,message", [
    ("hostile.pickle", "refused: the file asks to load"),
    ("truncated.pickle", "damaged or truncated"),
    ("wrong_shape.pickle", "the model's has"),
    ("empty.pickle", "empty file"),
])
def test_hostile_or_damaged_file_is_refused_on_sharded_model(ranks, name, message):
    assert name in HOSTILE
    for report in ranks[1]:
        kind, text = report[name]
        assert kind == "RegParamsError" and name in text and message in text, report[name]


def test_full_tensor_of_wrong_shape_is_refused_when_sharding(ranks):
    for report in ranks[1]:
        kind, text = report["wrong_shape_error"]
        assert kind == "ValueError" and "4.weight" in text and "(5, 1)" in text, text


def test_omega_of_dtensor_parameter_not_from_fully_shard_is_refused(ranks):
    for report in ranks[1]:
        kind, text = report["unmanaged_error"]
        assert kind == "ValueError" and "'7.weight'" in text and "fully_shard" in text, text


def test_penalty_of_sharded_model_is_the_total_over_ranks(ranks):
    want = one_process_training()[2]
    for report in ranks[1]:
        assert abs(report["penalty"] - want) <= 1e-5 * want, (report["penalty"], want)


def test_failed_write_of_sharded_reg_params_is_an_error_on_every_rank(ranks):
    for report in ranks[1]:
        kind, text = report["failed_save_error"]
        assert kind in ("NotADirectoryError", "FileExistsError", "OSError"), report
        assert "one_process.pickle" in text, text


def test_reg_params_and_importance_never_import_the_sharded_module():
    """The FSDP2 module sits on top (issue 19): the modules beneath it never import it."""
    import ast

    root = Path(mas_optim.__file__).parent
    for path in [root / "reg_params.py", *sorted((root / "importance").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == "sharded" or n.endswith(".sharded") for n in names), path.name
