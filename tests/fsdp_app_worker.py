"""One rank of tests/test_fsdp_app.py: the application's task model under FSDP2 (gloo, CPU).

    python tests/fsdp_app_worker.py RANK WORLD PORT OUT_DIR

For each penalty step (gradient, proximal): an uninterrupted run of STEPS LocalSgd steps on a
sharded ``TaskModel``, and a run checkpointed after CUT steps with ``utils.fsdp``, restored into
a fresh sharded model and optimizer and continued. Then the evaluation of an earlier task's
head over unevenly dealt batches, and Ω folded into reg_params and saved. Writes what the tests
check into OUT_DIR; the model, data and settings are defined here and imported by the tests,
so the one-process references use exactly the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mas_optim
from helpers import rank_main
from mas_optim.sharded import shard_reg_params_like
from model_class import TaskModel, build_shared, freeze_first_layers, new_head
from utils.fsdp import (all_finite, even_batches, full_optimizer_state, full_state,
                        shard_optimizer_state_like, shard_task_model)

SAMPLE = (1, 8, 8)
HIDDEN, CLASSES, FROZEN = 7, 3, 1   # odd first dimensions: the ranks' slices differ in size
STEPS, CUT, LOCAL_BATCH = 6, 3, 4
LR, MOMENTUM, REG_LAMBDA = 0.05, 0.9, 0.5
PENALTY_STEPS = ("gradient", "proximal")


def make_task_model(seed: int = 0) -> TaskModel:
    """The cnn backbone with one head, its first layer frozen, as the trainer builds it."""
    torch.manual_seed(seed)
    shared, width = build_shared("cnn", SAMPLE, HIDDEN)
    model = TaskModel(shared, new_head(width, CLASSES, seed + 1))
    freeze_first_layers(model, FROZEN)
    return model


def start_reg_params(model: TaskModel) -> dict:
    """Full reg_params of the trainable shared parameters with a nonzero Ω and θ* ≠ θ, so the
    penalty acts from the first step (the head is not regularised, as in the trainer)."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    heads = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    reg = mas_optim.init_reg_params(model, freeze_layers=frozen + heads)
    g = torch.Generator().manual_seed(3)
    for entry in reg.values():
        entry["omega"].uniform_(0, 1, generator=g)
        entry["init_val"].add_(0.1)
    return reg


def make_optimizer(model: TaskModel, reg: dict, penalty_step: str) -> mas_optim.LocalSgd:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return mas_optim.LocalSgd(trainable, reg_params=reg, reg_lambda=REG_LAMBDA, lr=LR,
                              momentum=MOMENTUM, proximal=penalty_step == "proximal",
                              track_path_integral=True)


def train_batches() -> list:
    """STEPS global batches of 2·LOCAL_BATCH samples; under 2 ranks rank r takes half r."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(2 * LOCAL_BATCH, *SAMPLE, generator=g),
             torch.randint(0, CLASSES, (2 * LOCAL_BATCH,), generator=g)) for _ in range(STEPS)]


def eval_batches() -> list:
    """5 batches of 4: dealt round robin, rank 0 gets 3 and rank 1 gets 2 (as fixed_shard)."""
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(4, *SAMPLE, generator=g), torch.randint(0, CLASSES, (4,), generator=g))
            for _ in range(5)]


def old_head() -> torch.nn.Linear:
    """The head of an earlier task (plain, evaluated only)."""
    return new_head(HIDDEN, CLASSES, 5)


def train_steps(model: TaskModel, opt: mas_optim.LocalSgd, steps: range, rank: int,
                world: int) -> None:
    """The given steps; under ``world`` ranks this rank's part of every global batch (FSDP
    averages the parts' mean gradients: the whole batch's mean gradient)."""
    part = slice(rank * LOCAL_BATCH * 2 // world, (rank + 1) * LOCAL_BATCH * 2 // world)
    batches = train_batches()
    for i in steps:
        x, y = batches[i]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()


def digest(obj) -> str:
    """A hash of every tensor in a (nested) state: equal on every rank or not."""
    h = hashlib.sha256()

    def walk(o) -> None:
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, torch.Tensor):
            h.update(o.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def checkpoint(model: TaskModel, opt: mas_optim.LocalSgd, reg: dict) -> dict:
    """The run state the trainer would commit, gathered on every rank."""
    return {"shared": full_state(model.part_state("shared")),
            "head": full_state(model.part_state("head")),
            "optimizer": full_optimizer_state(opt),
            "reg_params": {n: full_state(d) for n, d in reg.items()}}


def restore(state: dict, penalty_step: str) -> tuple[TaskModel, mas_optim.LocalSgd, dict]:
    """A fresh model (other initial weights) loaded from ``state``, sharded, with reg_params
    and optimizer state cut to this rank's slices."""
    model = make_task_model(seed=99)
    model.load_part("shared", state["shared"])
    model.load_part("head", state["head"])
    shard_task_model(model, torch.device("cpu"))
    reg = shard_reg_params_like(state["reg_params"], model)
    opt = make_optimizer(model, reg, penalty_step)
    opt.load_state_dict(shard_optimizer_state_like(state["optimizer"], opt))
    return model, opt, reg


def run(rank: int, world: int, out: str) -> None:
    report: dict = {}
    cpu = torch.device("cpu")
    for penalty_step in PENALTY_STEPS:
        # Uninterrupted.
        model = shard_task_model(make_task_model(), cpu)
        reg = shard_reg_params_like(start_reg_params(make_task_model()), model)
        opt = make_optimizer(model, reg, penalty_step)
        train_steps(model, opt, range(STEPS), rank, world)
        final = checkpoint(model, opt, reg)
        report[f"{penalty_step}_penalty"] = float(opt.penalty())
        report[f"{penalty_step}_sharded"] = all(
            isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())

        # Checkpointed after CUT steps, written and read back as the trainer would, restored
        # into a fresh model, continued.
        model_b = shard_task_model(make_task_model(), cpu)
        reg_b = shard_reg_params_like(start_reg_params(make_task_model()), model_b)
        opt_b = make_optimizer(model_b, reg_b, penalty_step)
        train_steps(model_b, opt_b, range(CUT), rank, world)
        state = checkpoint(model_b, opt_b, reg_b)
        report[f"{penalty_step}_same_on_ranks"] = len(
            set(_gather(digest(state), world))) == 1
        path = os.path.join(out, f"checkpoint_{penalty_step}.pt")
        if rank == 0:
            torch.save(state, path)
        dist.barrier()
        del model_b, opt_b, reg_b, state
        model_c, opt_c, reg_c = restore(torch.load(path, weights_only=True), penalty_step)
        train_steps(model_c, opt_c, range(CUT, STEPS), rank, world)
        resumed = checkpoint(model_c, opt_c, reg_c)
        report[f"{penalty_step}_resumed_identical"] = digest(resumed) == digest(final)
        report[f"{penalty_step}_resumed_local_identical"] = all(
            torch.equal(a.to_local(), b.to_local())
            for a, b in zip(model.parameters(), model_c.parameters()))
        if rank == 0:
            torch.save(final, os.path.join(out, f"final_{penalty_step}.pt"))

    # Evaluation: an earlier task's plain head swapped in, then the model's own (sharded) head;
    # rank 0 has 3 batches, rank 1 has 2 (even_batches pads rank 1 with an empty one).
    own = model.head
    counts = {}
    with torch.no_grad():
        for label, head in (("old", old_head()), ("own", own)):
            model.head = head
            mine = eval_batches()[rank::world]
            correct = total = 0
            for x, y in even_batches(mine, SAMPLE):
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
            counts[label] = [correct, total]
    model.head = own
    report["eval_counts"] = counts

    # Importance over unevenly dealt batches, folded into the sharded reg_params, saved.
    omega = mas_optim.compute_omega(model, [(x,) for x, _ in eval_batches()[rank::world]])
    reg = mas_optim.consolidate_reg_params(reg, model, omega)
    mas_optim.save_reg_params(reg, os.path.join(out, "reg_params.pickle"))

    # A NaN in rank 1's slice of one parameter only: every rank sees it.
    report["finite_before"] = all_finite(model.parameters())
    with torch.no_grad():
        last = list(model.parameters())[-1].to_local()
        if rank == world - 1 and last.numel():
            last.view(-1)[0] = float("nan")
    report["finite_after_nan_on_last_rank"] = all_finite(model.parameters())

    # A full optimizer state of another model is refused when cut to slices.
    wrong = full_optimizer_state(opt)
    wrong["state"][0] = {k: v[:1] if isinstance(v, torch.Tensor) else v
                         for k, v in wrong["state"][0].items()}
    try:
        shard_optimizer_state_like(wrong, opt)
        report["wrong_shape_error"] = None
    except Exception as e:
        report["wrong_shape_error"] = [type(e).__name__, str(e)]

    with open(os.path.join(out, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)


def _gather(value: str, world: int) -> list:
    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


if __name__ == "__main__":
    rank_main(run)
