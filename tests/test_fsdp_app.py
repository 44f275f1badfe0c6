"""utils/fsdp.py: the application's task model under FSDP2, 2 gloo processes on loopback.

The ranks (tests/fsdp_app_worker.py) train, checkpoint, restore and evaluate a sharded
``TaskModel``; the tests compare what they wrote with one process on the unsharded model, and
the restored run with the uninterrupted one.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mas_optim
from helpers import run_ranks
from fsdp_app_worker import (PENALTY_STEPS, STEPS, make_optimizer, make_task_model,
                             old_head, start_reg_params, eval_batches, train_steps)
from utils.fsdp import full_optimizer_state, full_state, shard_optimizer_state_like

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")

WORKER = Path(__file__).with_name("fsdp_app_worker.py")
WORLD = 2
TIMEOUT_S = 120  # the ranks take about 15 s on 2 busy cores; a hang is killed after this


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_app")
    reports = run_ranks(WORKER, out, WORLD, TIMEOUT_S)
    return out, reports


def one_process(penalty_step: str):
    """The same steps on the unsharded model, whole batches."""
    model = make_task_model()
    reg = start_reg_params(make_task_model())
    opt = make_optimizer(model, reg, penalty_step)
    train_steps(model, opt, range(STEPS), rank=0, world=1)
    return model, opt, reg


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
def test_resumed_sharded_run_is_bit_identical_to_uninterrupted(ranks, penalty_step):
    for report in ranks[1]:
        assert report[f"{penalty_step}_sharded"]
        # weights, heads, momentum buffers, path-integral state and reg_params, gathered
        assert report[f"{penalty_step}_resumed_identical"]
        # and each rank's own slices of the weights
        assert report[f"{penalty_step}_resumed_local_identical"]


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
def test_gathered_state_is_the_same_on_every_rank(ranks, penalty_step):
    for report in ranks[1]:
        assert report[f"{penalty_step}_same_on_ranks"]


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
def test_gathered_weights_match_one_process(ranks, penalty_step):
    out, _ = ranks
    got = torch.load(out / f"final_{penalty_step}.pt", weights_only=True)
    model, _, _ = one_process(penalty_step)
    start = make_task_model().state_dict()
    for part in ("shared", "head"):
        want = model.part_state(part)
        assert got[part].keys() == want.keys()
        for n, w in want.items():
            if n != "shared.0.weight" and n != "shared.0.bias":   # the frozen layer
                assert not torch.equal(w, start[n]), n    # the steps moved it
            assert rel_err(got[part][n], w) <= 1e-5, (n, rel_err(got[part][n], w))


@pytest.mark.parametrize("penalty_step", PENALTY_STEPS)
def test_gathered_optimizer_state_matches_one_process(ranks, penalty_step):
    out, reports = ranks
    got = torch.load(out / f"final_{penalty_step}.pt", weights_only=True)["optimizer"]
    _, opt, _ = one_process(penalty_step)
    want = full_optimizer_state(opt)   # a plain optimizer: its own state_dict, copied
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        assert got["state"][index].keys() == entry.keys()
        assert "momentum_buffer" in entry and "si_w" in entry
        for key, w in entry.items():
            assert rel_err(got["state"][index][key], w) <= 1e-5, (index, key)
    want_penalty = float(opt.penalty())
    for report in reports:
        assert abs(report[f"{penalty_step}_penalty"] - want_penalty) <= 1e-5 * want_penalty


def test_evaluation_with_uneven_batches_and_swapped_head_matches_one_process(ranks):
    out, reports = ranks
    final = torch.load(out / f"final_{PENALTY_STEPS[-1]}.pt", weights_only=True)
    model = make_task_model()
    model.load_part("shared", final["shared"])
    model.load_part("head", final["head"])
    own = model.head
    want = {}
    with torch.no_grad():
        for label, head in (("old", old_head()), ("own", own)):
            model.head = head
            preds = [model(x).argmax(dim=1) == y for x, y in eval_batches()]
            want[label] = [int(sum(p.sum() for p in preds)), sum(len(p) for p in preds)]
    for label in want:
        got = [sum(r["eval_counts"][label][i] for r in reports) for i in (0, 1)]
        assert got == want[label], (label, got, want[label])
        assert got[1] == 20


def test_reg_params_file_of_sharded_run_matches_one_process(ranks):
    out, _ = ranks
    final = torch.load(out / f"final_{PENALTY_STEPS[-1]}.pt", weights_only=True)
    model = make_task_model()
    model.load_part("shared", final["shared"])
    model.load_part("head", final["head"])
    reg = final["reg_params"]
    omega = mas_optim.compute_omega(model, [(x,) for x, _ in eval_batches()])
    want = mas_optim.consolidate_reg_params(reg, model, omega)
    got = mas_optim.load_reg_params(out / "reg_params.pickle", model=model)
    assert got.keys() == want.keys() and "head.weight" not in got
    for n in want:
        for k in ("omega", "init_val"):
            assert rel_err(got[n][k], want[n][k]) <= 1e-5, (n, k, rel_err(got[n][k], want[n][k]))


def test_a_nan_in_one_ranks_slice_is_seen_by_every_rank(ranks):
    for report in ranks[1]:
        assert report["finite_before"] is True
        assert report["finite_after_nan_on_last_rank"] is False


def test_optimizer_state_of_other_shape_is_refused(ranks):
    for report in ranks[1]:
        kind, text = report["wrong_shape_error"]
        assert kind == "ValueError" and "'shared.3.weight'" in text, text
        assert "(1, 32, 3, 3)" in text and "(64, 32, 3, 3)" in text, text


def test_full_state_of_plain_tensors_is_a_copy():
    t = torch.ones(3)
    full_state({"a": t})["a"].add_(1)
    assert torch.equal(t, torch.ones(3))


@pytest.mark.parametrize("state_dict", [None, {"param_groups": []}, {"state": [1]}])
def test_what_is_not_an_optimizer_state_dict_is_refused(state_dict):
    _, opt, _ = one_process("gradient")
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        shard_optimizer_state_like(state_dict, opt)
