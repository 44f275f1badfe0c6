"""The training loop: for each task, train its epochs, evaluate the tasks seen, compute the
importance by ``--method`` (``utils.methods.METHODS``), consolidate it into reg_params, commit.

Every epoch and every task ends in a commit of the whole ``RunState`` (``utils.checkpoint``);
the run can be killed anywhere and resumed bit-identically. Under torchrun every rank runs the
same loop on its share of the data, rank 0 alone writes, and each commit is an
``error_barrier`` (``utils.distributed``).
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mas_optim
from mas_optim.sharded import shard_reg_params_like
from model_class import TaskModel, freeze_first_layers, new_head
from utils import AppError
from utils.backbone import build_backbone
from utils.checkpoint import (CHECKPOINT, PLOT, RESULTS, SHARED, RegParams, RunDir, RunState,
                              Tensors, rng_state, set_rng_state, to_bytes)
from utils.config import LR_GAMMA, LR_STEP_EPOCHS, Config
from utils.data import Task, derived_seed, fixed_shard, train_shard
from utils.distributed import Dist, everywhere
from utils.evaluate import accuracy, plot, results, results_json
from utils import fsdp, lambda_search
from utils.methods import METHODS, AfterTask
from utils.omega_data import OmegaInputs
from utils.optimizers import build_optimizer, check_sharding
from utils.scenarios import carry_head, head_classes, scenario_tasks, shared_head


def log(message: str) -> None:
    """A line of progress, printed above any progress bar (stdout; rank 0 only under torchrun:
    the other ranks' stdout is closed)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def bar(iterable: Iterable, desc: str) -> Iterable:
    """A progress bar on a terminal; nothing when stdout is not one (logs, CI, other ranks)."""
    return tqdm(iterable, desc=desc, leave=False, file=sys.stdout, dynamic_ncols=True,
                disable=None)


class Diverged(AppError):
    """Training produced a non-finite loss, parameter or importance."""


def _shapes(tensors: Tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


class Trainer:
    """Runs the task sequence from a committed ``RunState``; every write goes through RunDir."""

    def __init__(self, config: Config, tasks: list[Task], run_dir: RunDir, device: torch.device,
                 dist: Dist) -> None:
        self.config, self.run_dir = config, run_dir
        self.tasks = scenario_tasks(config.scenario, tasks)  # labels as --scenario trains
        self.device, self.dist = device, dist
        self.method = METHODS[config.method]
        self.omega_inputs = OmegaInputs(config.omega_data, config.benchmark, self.tasks)
        check_sharding(config)

    def run(self, state: RunState, resumed: bool) -> dict[str, Any]:
        """Train every unfinished task; return the results document."""
        if resumed:
            if not self.dist.active:  # under torchrun the RNG is seeded per epoch and rank
                set_rng_state(state.rng, self.device)
            if state.epoch == 0:  # a task commit may have been cut off before its public files
                with self.dist.error_barrier():
                    if self.dist.is_main:
                        export(self.run_dir, state)
        while state.task < len(self.tasks):
            state = self.train_task(state)
        return results(state.tasks, state.acc_matrix, self.config.to_dict(), state.lambdas)

    def train_task(self, state: RunState) -> RunState:
        cfg, t = self.config, state.task
        state = lambda_search.before_task(self, state)  # --reg_lambda auto: choose this task's
        with self.dist.error_barrier():
            model, optimizer, penalty, scheduler, reg_params = self.restore(state)
        # DDP under torchrun: it averages the task gradient (FSDP, the model itself, does too)
        net = model if cfg.fsdp else self.dist.wrap(model)
        label = f"task {t + 1}/{len(self.tasks)} ({self.tasks[t].name})"
        every = max(1, math.ceil(cfg.num_epochs / 5))
        for epoch in range(state.epoch, cfg.num_epochs):
            loss, mas_penalty = self.train_epoch(net, optimizer, penalty, t, epoch, label)
            scheduler.step()
            if not fsdp.all_finite(model.parameters()):
                raise self.diverged(t, epoch, "a parameter became NaN or Inf")
            # full CPU tensors on every rank, also under --fsdp (gathered from the slices)
            state = state.after_epoch(
                shared=fsdp.full_state(model.part_state("shared")),
                head=fsdp.full_state(model.part_state("head")),
                optimizer=fsdp.full_optimizer_state(optimizer),
                scheduler=scheduler.state_dict(), rng=rng_state(self.device))
            self.commit(state)
            self.run_dir.crash_test.kill_point("after-epoch")
            if (epoch + 1) % every == 0 or epoch + 1 == cfg.num_epochs:
                log(f"{label} epoch {epoch + 1}/{cfg.num_epochs}: loss {loss:.4f}, MAS penalty "
                    f"{mas_penalty:.4f}")
        del net
        row = self.evaluate_seen(model, state)
        omega = self.method.importance(AfterTask(
            model, optimizer, reg_params, lambda: self.importance_batches(t, label),
            per_sample=cfg.omega == "per-sample"))
        if not fsdp.all_finite(omega.values()):
            raise self.diverged(t, cfg.num_epochs - 1, "the importance Omega is not finite")
        reg_params = mas_optim.consolidate_reg_params(reg_params, model, omega,
                                                      accumulate=cfg.accumulate)
        state = state.after_task(
            fsdp.full_state(model.part_state("head")), row,
            shared=fsdp.full_state(model.part_state("shared")),
            reg_params={n: fsdp.full_state(d) for n, d in reg_params.items()},
            rng=rng_state(self.device))
        self.commit(state, task_done=True)
        log(f"{label} done: accuracy " + " ".join(f"{a:.1f}" for a in row))
        self.run_dir.crash_test.kill_point("after-task")
        return state

    def commit(self, state: RunState, task_done: bool = False) -> None:
        """Rank 0 writes the checkpoint (after a task also the public files derived from it);
        no rank goes on before that is done. After a task the ranks first compare what they
        commit: DDP keeps them bit-identical, a difference is a bug and nothing is written."""
        with self.dist.error_barrier():
            if task_done:
                self.dist.check_same({**state.shared, **state.heads[-1], **{
                    f"{n}.{k}": v for n, d in state.reg_params.items() for k, v in d.items()}},
                    f"the model and importance after task {state.task}")
            if self.dist.is_main:
                self.run_dir.save_checkpoint(state)
                if task_done:
                    export(self.run_dir, state)

    # --- the model of a state ------------------------------------------------------------------
    def new_state(self) -> RunState:
        """Fresh weights from --seed, zero importance (task 1 is trained without penalty)."""
        cfg = self.config
        if cfg.arch == "alexnet" and not cfg.pretrained:
            log("note: no --pretrained weights: AlexNet trains from scratch (random "
                "initialisation)")
        torch.manual_seed(cfg.seed)
        model = self.build_model(0, cfg.pretrained)
        frozen = freeze_first_layers(model, cfg.num_freeze_layers)
        # a head per task is no task's memory; one head shared by every task is
        head_names = [] if shared_head(cfg.scenario) else [
            f"head.{n}" for n, _ in model.head.named_parameters()]
        reg_params = mas_optim.init_reg_params(model, freeze_layers=frozen + head_names)
        return RunState(config=cfg.to_dict(), tasks=[t.name for t in self.tasks],
                        classes=[t.classes for t in self.tasks],
                        shared=fsdp.full_state(model.part_state("shared")),
                        reg_params={n: fsdp.full_state(d) for n, d in reg_params.items()},
                        rng=rng_state(self.device))

    def build_model(self, task: int, pretrained: str | None = None) -> TaskModel:
        """A new backbone (global RNG) with task ``task``'s head (seeded by --seed and task)."""
        shared, width = build_backbone(self.config.arch, self.tasks[0].input_shape,
                                       self.config.hidden, pretrained)
        classes = head_classes(self.config.scenario, [t.classes for t in self.tasks], task)
        head = new_head(width, len(classes),
                        derived_seed(self.config.seed, "head", task))
        return TaskModel(shared, head)

    def restore(self, state: RunState) -> tuple[TaskModel, torch.optim.Optimizer,
                                                Callable[[], torch.Tensor], Any, RegParams]:
        """Model, optimizer (and its penalty's value), scheduler and reg_params of a committed
        state. The model is built without touching the global RNG, so that a resumed run draws
        the same dropout and augmentation numbers as an uninterrupted one."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            model = self.build_model(state.task)
        freeze_first_layers(model, cfg.num_freeze_layers)
        reg_params = self.carry_head(state, model)
        self.check_fits(state, model, reg_params)
        model.load_part("shared", state.shared)
        if state.head is not None:
            model.load_part("head", state.head)
        reg_params = {n: {k: v.to(self.device, copy=True) for k, v in d.items()}
                      for n, d in reg_params.items()}
        if cfg.fsdp:  # each rank keeps its slices of the full weights it loaded; no traffic
            fsdp.shard_task_model(model, self.device)
            reg_params = shard_reg_params_like(reg_params, model)
        else:
            model.to(self.device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer, penalty = build_optimizer(cfg, trainable, reg_params,
                                             lambda_search.lambda_of(cfg.reg_lambda, state),
                                             self.method.track_path_integral)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, LR_STEP_EPOCHS, LR_GAMMA)
        if state.optimizer is not None:
            try:  # a state dict of other parameter groups: ValueError; a malformed one: KeyError
                with warnings.catch_warnings():  # Ω/θ* come from reg_params (not saved twice)
                    warnings.filterwarnings("ignore", message=".*carries no Ω/θ\\*")
                    optimizer.load_state_dict(
                        fsdp.shard_optimizer_state_like(state.optimizer, optimizer))
                scheduler.load_state_dict(state.scheduler)
            except (ValueError, KeyError) as exc:
                raise self.does_not_fit(f"optimizer state: {exc}") from None
            for name, p in trainable:
                for key, value in optimizer.state[p].items():
                    # (Adam's step count is a 0-dim tensor)
                    if isinstance(value, torch.Tensor) and value.dim() and \
                            value.shape != p.shape:
                        raise self.does_not_fit(f"optimizer {key} of {name}")
        return model, optimizer, penalty, scheduler, reg_params

    def carry_head(self, state: RunState, model: TaskModel) -> RegParams:
        """Under --scenario domain/class, the previous task's head goes on in ``model``'s (under
        class its first rows) and reg_params grow with it (``mas_optim.grow_reg_params``: new
        rows Omega 0, theta* their initial values, the same after a resume); the reg_params."""
        if not shared_head(self.config.scenario) or state.task == 0:
            return state.reg_params
        try:
            carry_head(model.head, state.heads[-1])
            return mas_optim.grow_reg_params(state.reg_params, model)
        except (ValueError, KeyError) as exc:
            raise self.does_not_fit(f"head: {exc}") from None

    def check_fits(self, state: RunState, model: TaskModel, reg_params: RegParams) -> None:
        """Names and shapes of the state's tensors against the model it must load into."""
        if _shapes(state.shared) != _shapes(model.part_state("shared")):
            raise self.does_not_fit("shared weights")
        if state.head is not None and _shapes(state.head) != _shapes(model.part_state("head")):
            raise self.does_not_fit("head")
        regularised = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad
                       and (n.startswith("shared.") or shared_head(self.config.scenario))}
        if {n: tuple(d["omega"].shape) for n, d in reg_params.items()} != regularised or \
                {n: tuple(d["init_val"].shape) for n, d in reg_params.items()} != regularised:
            raise self.does_not_fit("reg_params")

    def does_not_fit(self, what: str) -> AppError:
        return AppError(f"{self.run_dir.path(CHECKPOINT)}: does not fit the model ({what[:160]})")

    # --- one epoch, evaluation, importance data -----------------------------------------------
    def train_epoch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    penalty: Callable[[], torch.Tensor], t: int, epoch: int, label: str
                    ) -> tuple[float, float]:
        """One pass over task ``t``'s data in an order fixed by (seed, task, epoch); under
        torchrun over this rank's shard of it. Returns the mean loss and the penalty."""
        dist, seed = self.dist, self.config.seed
        model.train()
        if dist.active:
            # the global RNG (dropout, random flips) as a pure function of (seed, task, epoch,
            # rank): a resume with as many processes continues exactly, and ranks differ
            torch.manual_seed(derived_seed(seed, "rng", t, epoch, dist.rank))
        loader = train_shard(self.tasks[t].train, self.config.batch_size,
                             derived_seed(seed, t, epoch), dist.rank, dist.world)
        total, seen, middle = 0.0, 0, len(loader) // 2
        bad: float | None = None
        for i, (x, y) in enumerate(bar(loader, f"{label} epoch {epoch + 1}")):
            if i == middle:
                self.run_dir.crash_test.kill_point("mid-epoch")
            x, y = x.to(self.device), y.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                if not dist.active:
                    raise self.diverged(t, epoch, f"the loss became {loss.item()}")
                # every rank must take every step (DDP's backward is a collective): note it,
                # agree at the end of the epoch; this epoch is never committed
                bad = loss.item() if bad is None else bad
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
        if dist.active:
            ranks = dist.gather((total, seen, bad))
            total, seen = sum(r[0] for r in ranks), sum(r[1] for r in ranks)
            bad = next((r[2] for r in ranks if r[2] is not None), None)
            if bad is not None:
                raise self.diverged(t, epoch, f"the loss became {bad}")
        mas_penalty = float(penalty())  # the total over ranks when sharded
        if not math.isfinite(mas_penalty):
            raise self.diverged(t, epoch, f"the MAS penalty became {mas_penalty}")
        return total / max(seen, 1), mas_penalty

    def evaluate_seen(self, model: TaskModel, state: RunState) -> list[float]:
        """Test accuracy on every task trained so far, each with its own head; under torchrun
        each rank evaluates its share and the counts are summed over the ranks."""
        own_head, row = model.head, []
        for j in range(state.task + 1):
            if j < state.task and not shared_head(self.config.scenario):
                model.head = new_head(own_head.in_features, len(self.tasks[j].classes), 0)
                model.load_part("head", state.heads[j])
                model.head.to(self.device)
            else:
                model.head = own_head
            loader = fixed_shard(self.tasks[j].test, self.config.batch_size, self.dist.rank,
                                 self.dist.world)
            if self.config.fsdp:  # each forward all-gathers: as many on every rank
                loader = fsdp.even_batches(loader, self.tasks[j].input_shape)
            row.append(accuracy(model, loader, self.device,
                                self.dist.sum_counts if self.dist.active else None))
        return row

    def importance_batches(self, t: int, label: str) -> Iterator[torch.Tensor]:
        """The inputs of task ``t``'s importance pass (--omega_data; no labels: MAS needs none)
        in fixed order, on the device; under torchrun this rank's whole batches of them."""
        loader = fixed_shard(self.omega_inputs.dataset(t), self.config.batch_size,
                             self.dist.rank, self.dist.world)
        middle = len(loader) // 2
        for i, batch in enumerate(bar(loader, f"{label} importance")):
            if i == middle:
                self.run_dir.crash_test.kill_point("importance")
            yield batch[0].to(self.device)

    def diverged(self, t: int, epoch: int, what: str) -> Diverged:
        cfg = self.config
        advice = ("the explicit penalty step 2*lr*reg_lambda*Omega is too large; lower --init_lr "
                   "or --reg_lambda, or use --penalty_step proximal" if cfg.penalty_step ==
                   "gradient" else "the task loss's step is too large; lower --init_lr")
        if cfg.optimizer != "sgd":
            advice = "the step is too large; lower --init_lr or --reg_lambda"
        # every check that raises it sees the same values on every rank (parameters, penalty
        # and Omega are identical under DDP; the losses are gathered first)
        return everywhere(Diverged(
            f"training diverged on task {t + 1}, epoch {epoch + 1}: {what} with --reg_lambda "
            f"{cfg.reg_lambda} and --init_lr {cfg.init_lr} ({advice}) and start again with "
            f"--overwrite. The last good state is kept in {self.run_dir.path(CHECKPOINT)}"))


def export(run_dir: RunDir, state: RunState) -> None:
    """Write the original layout's files from a committed state (unchanged ones are skipped)."""
    if state.task == 0:
        return
    for k in range(state.task):
        folder = run_dir.task_dir(k)
        run_dir.write(f"{folder}/head.pth", to_bytes(state.heads[k]))
        names = head_classes(state.config["scenario"], state.classes, k)  # the head's outputs
        run_dir.write(f"{folder}/classes.txt", ("\n".join(names) + "\n").encode())
        run_dir.write(f"{folder}/performance.txt", f"{state.acc_matrix[k][k]:.4f}\n".encode())
    run_dir.write_reg_params(state.reg_params)
    run_dir.write(SHARED, to_bytes(state.shared))
    doc = results(state.tasks, state.acc_matrix, state.config, state.lambdas)
    run_dir.write(RESULTS, results_json(doc))
    if state.task == len(state.tasks):
        run_dir.write(PLOT, plot(doc))
