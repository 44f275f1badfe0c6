"""Learn a sequence of tasks with Memory Aware Synapses and report forgetting.

For each task: train the shared model and the task's head with ``mas_optim.LocalSgd`` (the MAS
penalty lambda * sum Omega (theta - theta*)^2 of Aljundi et al. 2018, Eq. 3, applied inside the
optimiser step), evaluate every task seen so far, estimate parameter importance Omega on the
task's training data (``mas_optim.compute_omega``, Eq. 2), fold it into reg_params
(``consolidate_reg_params``) and commit everything to ``--output_dir``.

Under ``torchrun --standalone --nproc_per_node N train.py ...`` it trains data-parallel
(DistributedDataParallel, gloo on CPUs, NCCL with --use_gpu); only rank 0 writes and prints.

Run ``python train.py --help`` for the flags; README.md describes outputs and numbers
(its section "Running distributed" the torchrun details).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

import mas_optim
from model_class import ARCHS, TaskModel, build_shared, freeze_first_layers, new_head
from utils import AppError
from utils.checkpoint import (CHECKPOINT, CHECKPOINT_VERSION, PLOT, RESULTS, SHARED, CrashHook,
                              RunDir, to_bytes)
from utils.data import (BENCHMARKS, Task, derived_seed, fixed_shard, image_folder_tasks,
                        permuted_digits, split_digits, split_mnist, train_shard)
from utils.distributed import Dist, everywhere, is_everywhere
from utils.evaluate import accuracy, plot, report, results, results_json

LR_STEP_EPOCHS = 20  # the original decays the learning rate x0.1 every 20 epochs
LR_GAMMA = 0.1
MOMENTUM = 0.9
# Per-benchmark defaults (None on the command line = take these). The digits settings were
# tuned by running fine-tuning (--reg_lambda 0) against MAS; see README.md for the numbers.
# "folders" keeps the original repository's defaults (batch 8, 10 epochs, lr 1e-3, lambda 0.01).
DEFAULTS: dict[str, dict[str, Any]] = {
    "split-digits": dict(num_epochs=20, batch_size=16, init_lr=0.05, reg_lambda=0.1,
                         hidden=64, arch="mlp"),
    "permuted-digits": dict(num_epochs=10, batch_size=16, init_lr=0.05, reg_lambda=0.1,
                            hidden=128, arch="mlp"),
    "split-mnist": dict(num_epochs=2, batch_size=64, init_lr=0.05, reg_lambda=0.1,
                        hidden=256, arch="mlp"),
    "folders": dict(num_epochs=10, batch_size=8, init_lr=0.001, reg_lambda=0.01, hidden=256,
                    arch="alexnet"),
}
FLAG_DEFAULTS: dict[str, Any] = dict(
    benchmark=None, data_dir=None, mnist_root=None, arch=None, image_size=None, hidden=None,
    pretrained=None, num_freeze_layers=None, num_epochs=None, batch_size=None, init_lr=None,
    reg_lambda=None, method="mas", omega="per-sample", accumulate="sum", proximal=False, seed=0,
    output_dir="models",
    resume=False, overwrite=False, use_gpu=False)
IMAGE_SIZE_DEFAULT = {"alexnet": 224, "cnn": 32, "mlp": 32}
# Settings that determine the result: stored in the checkpoint and results.json, and checked
# against explicitly given flags on --resume.
CONFIG_KEYS = ("benchmark", "data_dir", "mnist_root", "arch", "image_size", "hidden",
               "pretrained", "num_freeze_layers", "num_epochs", "batch_size", "init_lr",
               "reg_lambda", "method", "omega", "accumulate", "proximal", "seed")
METHODS = ("mas", "lmas", "si", "finetune")


# --- command line ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as ONE line (exit 2), like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, minimum: float, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"{text} must be {'>' if strict else '>='} {minimum}")
        return value
    return parse


def _accumulate(text: str) -> str | float:
    if text == "sum":
        return text
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'sum' or a number in [0, 1]") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: alpha must be in [0, 1]")
    return alpha


def _defaults(key: str) -> str:
    """Per-benchmark defaults of one flag, for --help."""
    return ", ".join(f"{'--data_dir' if name == 'folders' else name} {values[key]}"
                     for name, values in DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", argument_default=argparse.SUPPRESS, description=(
        "Train a sequence of tasks with Memory Aware Synapses (Aljundi et al., ECCV 2018) and "
        "report forgetting. Without arguments: Split Digits (scikit-learn digits, 5 tasks of 2 "
        "digits), under a minute on a CPU."))
    p.add_argument("--benchmark", choices=BENCHMARKS,
                   help="built-in task sequence (default split-digits; not with --data_dir): "
                        "split-digits, permuted-digits (5 pixel permutations, 10 classes each), "
                        "split-mnist (needs --mnist_root)")
    p.add_argument("--data_dir",
                   help="folder with one sub-folder per task (sorted), each holding train/ and "
                        "test/ in ImageFolder layout (<split>/<class>/<image>)")
    p.add_argument("--mnist_root",
                   help="for split-mnist: folder holding MNIST/raw/ with MNIST's four idx files")
    p.add_argument("--arch", choices=ARCHS,
                   help="shared backbone: mlp (default for built-in benchmarks), cnn, alexnet "
                        "(default with --data_dir; AlexNet's features+classifier shared, its last "
                        "layer one head per task)")
    p.add_argument("--image_size", type=_number(int, 0, True),
                   help="images are resized to NxN (--data_dir only; default 224 for alexnet, "
                        "32 for cnn/mlp; alexnet needs >= 63)")
    p.add_argument("--hidden", type=_number(int, 0, True),
                   help=f"width of the mlp/cnn backbone (default {_defaults('hidden')})")
    p.add_argument("--pretrained", metavar="PATH",
                   help="torchvision AlexNet ImageNet weights file (e.g. alexnet-owt-7be5be79.pth)"
                        "; nothing is downloaded, without it AlexNet trains from scratch")
    p.add_argument("--num_freeze_layers", type=_number(int, 0, False),
                   help="freeze the first K conv/linear layers of the shared backbone: neither "
                        "trained nor regularised (default 2 for alexnet, 0 otherwise)")
    p.add_argument("--num_epochs", type=_number(int, 0, True),
                   help=f"epochs per task (default {_defaults('num_epochs')})")
    p.add_argument("--batch_size", type=_number(int, 0, True),
                   help=f"batch size (default {_defaults('batch_size')})")
    p.add_argument("--init_lr", type=_number(float, 0, True),
                   help=f"initial learning rate, x{LR_GAMMA} every {LR_STEP_EPOCHS} epochs, SGD "
                        f"momentum {MOMENTUM} (default {_defaults('init_lr')})")
    p.add_argument("--reg_lambda", type=_number(float, 0, False),
                   help="MAS penalty strength lambda in lambda*sum(Omega*(theta-theta*)^2); 0 is "
                        f"plain fine-tuning (default {_defaults('reg_lambda')})")
    p.add_argument("--method", choices=METHODS,
                   help="importance Omega after each task: mas (default; the paper's global "
                        "MAS), lmas (the paper's local Hebbian variant, per layer), si "
                        "(Synaptic Intelligence's path integral), finetune (no penalty)")
    p.add_argument("--proximal", action="store_true",
                   help="apply the penalty by its exact proximal map instead of a gradient "
                        "step (stable for any reg_lambda)")
    p.add_argument("--omega", choices=("per-sample", "batch"),
                   help="importance: mean over samples of |d||f(x)||^2/dtheta| (per-sample, the "
                        "paper's Eq. 2) or from the gradient of whole batches (faster, coarser)")
    p.add_argument("--accumulate", type=_accumulate,
                   help="how Omega of a new task joins the old: 'sum' (the paper) or alpha in "
                        "[0,1] for a running average")
    p.add_argument("--seed", type=int,
                   help="seed for initialisation and data order (default 0)")
    p.add_argument("--output_dir",
                   help="where shared_model.pth, reg_params.pickle, Task_k/, results.json, "
                        "accuracy.png and checkpoint.pth go (default models)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir from its last checkpoint (finished "
                        "tasks are not redone; on a finished run just print its report)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --output_dir holds one")
    p.add_argument("--use_gpu", action="store_true",
                   help="train on the CUDA GPU (under torchrun: cuda:LOCAL_RANK, NCCL)")
    return p


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The parsed flags with defaults filled in, and the flags the user actually typed (what
    --resume checks against the stored run)."""
    given = vars(build_parser().parse_args(argv))
    return argparse.Namespace(**{**FLAG_DEFAULTS, **given}), given


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of a new run: flags, then per-benchmark defaults."""
    if args.data_dir is not None and args.benchmark is not None:
        raise AppError("give either --benchmark or --data_dir, not both")
    benchmark = "folders" if args.data_dir is not None else (args.benchmark or "split-digits")
    config = {k: getattr(args, k) for k in CONFIG_KEYS if k != "benchmark"}
    config["benchmark"] = benchmark
    arch = args.arch or DEFAULTS[benchmark]["arch"]
    config["arch"] = arch
    for key, value in DEFAULTS[benchmark].items():
        if config.get(key) is None:
            config[key] = value
    if config["num_freeze_layers"] is None:
        config["num_freeze_layers"] = 2 if arch == "alexnet" else 0
    if benchmark == "folders":
        config["image_size"] = args.image_size or IMAGE_SIZE_DEFAULT[arch]
    elif args.image_size is not None:
        raise AppError("--image_size applies to --data_dir images only")
    if config["method"] == "finetune":
        if args.reg_lambda:
            raise AppError("--method finetune has no penalty: drop --reg_lambda")
        config["reg_lambda"] = 0.0
    if args.pretrained is not None and arch != "alexnet":
        raise AppError("--pretrained holds AlexNet weights: use it with --arch alexnet")
    return {k: config[k] for k in CONFIG_KEYS}


def resume_config(stored: dict[str, Any], given: dict[str, Any], where: Path) -> dict[str, Any]:
    """The stored settings of the run to resume; refuse flags that would change its result."""
    for key in CONFIG_KEYS:
        if key in given and given[key] != stored.get(key):
            raise AppError(f"--resume: {where} was started with --{key} {stored.get(key)}, not "
                           f"{given[key]} (drop the flag, or use another --output_dir)")
    return stored


def load_tasks(config: dict[str, Any]) -> list[Task]:
    benchmark = config["benchmark"]
    if benchmark == "folders":
        return image_folder_tasks(config["data_dir"], config["image_size"])
    if benchmark == "split-mnist":
        return split_mnist(config["mnist_root"])
    return split_digits() if benchmark == "split-digits" else permuted_digits()


# --- progress output ---------------------------------------------------------------------------
class Progress:
    """tqdm bars when stdout is a terminal; a few plain log lines otherwise (CI logs, files)."""

    def __init__(self, tty: bool, quiet: bool = False) -> None:
        self.tty = tty and not quiet
        self.quiet = quiet  # under torchrun, every rank but 0

    def bar(self, iterable: Iterable, desc: str) -> Iterable:
        if not self.tty:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, leave=False, file=sys.stdout, dynamic_ncols=True)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        else:
            print(message, flush=True)


# --- training ----------------------------------------------------------------------------------
class Diverged(AppError):
    """Training produced a non-finite loss or parameter."""


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


class Trainer:
    """Runs the task sequence from a committed state; every commit goes through ``RunDir``."""

    def __init__(self, config: dict[str, Any], tasks: list[Task], run_dir: RunDir,
                 device: torch.device, progress: Progress, dist: Dist | None = None) -> None:
        self.config = config
        self.tasks = tasks
        self.run_dir = run_dir
        self.device = device
        self.progress = progress
        self.hook = run_dir.hook
        # under torchrun: this rank; every write below is rank 0's, inside a dist.step() block
        self.dist = dist or Dist()

    # state <-> objects
    def initial_state(self) -> dict[str, Any]:
        """Fresh weights from --seed, zero importance (task 1 is trained without penalty)."""
        if self.config["arch"] == "alexnet" and not self.config["pretrained"]:
            self.progress.log("note: no --pretrained weights: AlexNet trains from scratch "
                              "(random initialisation)")
        torch.manual_seed(self.config["seed"])
        model = self._model(0, self.config["pretrained"])
        frozen = freeze_first_layers(model, self.config["num_freeze_layers"])
        head_names = [f"head.{n}" for n, _ in model.head.named_parameters()]
        reg_params = mas_optim.init_reg_params(model, freeze_layers=frozen + head_names)
        return {
            "version": CHECKPOINT_VERSION, "config": self.config,
            "tasks": [t.name for t in self.tasks], "classes": [t.classes for t in self.tasks],
            "task": 0, "epoch": 0, "shared": _cpu(model.part_state("shared")),
            "head": None, "heads": [], "optimizer": None, "scheduler": None,
            "reg_params": {n: _cpu(d) for n, d in reg_params.items()}, "acc_matrix": [],
            "rng": _rng_state(self.device),
        }

    def _model(self, task: int, pretrained: str | None) -> TaskModel:
        """A new backbone (global RNG) with task ``task``'s head (seeded by --seed and task)."""
        shared, width = build_shared(self.config["arch"], self.tasks[0].input_shape,
                                     self.config["hidden"], pretrained)
        head = new_head(width, len(self.tasks[task].classes),
                        derived_seed(self.config["seed"], "head", task))
        return TaskModel(shared, head)

    def _restore_model(self, state: dict[str, Any], task: int) -> TaskModel:
        """The model of a committed state. Built without touching the global RNG, so that a
        resumed run draws the same dropout/augmentation numbers as an uninterrupted one."""
        with torch.random.fork_rng(devices=[]):
            model = self._model(task, pretrained=None)
        model.load_part("shared", state["shared"])
        if state["head"] is not None:
            model.load_part("head", state["head"])
        freeze_first_layers(model, self.config["num_freeze_layers"])
        return model.to(self.device)

    # the run
    def run(self, state: dict[str, Any], resumed: bool) -> dict[str, Any]:
        """Train every unfinished task of a committed state; return the results document."""
        if resumed:
            if not self.dist.active:  # under torchrun the RNG is seeded per epoch and rank
                _set_rng_state(state["rng"], self.device)
            if state["epoch"] == 0:
                with self.dist.step():
                    if self.dist.is_main:  # a commit may have been cut off before its files
                        self.export(state)
        while state["task"] < len(self.tasks):
            state = self.train_task(state)
        return results(state["tasks"], state["acc_matrix"], self.config)

    def train_task(self, state: dict[str, Any]) -> dict[str, Any]:
        cfg, t = self.config, state["task"]
        task = self.tasks[t]
        with self.dist.step():
            model, optimizer, scheduler, reg_params = self._restore(state, t)
        # under torchrun the forward and backward go through DistributedDataParallel (which
        # averages the task gradient over the ranks); LocalSgd steps the same parameters
        net = self.dist.wrap(model)
        label = f"task {t + 1}/{len(self.tasks)} ({task.name})"
        every = max(1, math.ceil(cfg["num_epochs"] / 5))
        for epoch in range(state["epoch"], cfg["num_epochs"]):
            loss, penalty = self.train_epoch(net, optimizer, task, t, epoch, label)
            scheduler.step()
            self._check_finite(model, t, epoch, "a parameter")
            state = {**state, "epoch": epoch + 1, "shared": _cpu(model.part_state("shared")),
                     "head": _cpu(model.part_state("head")), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": _rng_state(self.device)}
            with self.dist.step():  # no rank goes on before rank 0 committed the epoch
                if self.dist.is_main:
                    self.run_dir.save_checkpoint(state)
            self.hook("after-epoch")
            if (epoch + 1) % every == 0 or epoch + 1 == cfg["num_epochs"]:
                self.progress.log(f"{label} epoch {epoch + 1}/{cfg['num_epochs']}: loss "
                                  f"{loss:.4f}, MAS penalty {penalty:.4f}")
        del net
        return self.finish_task(state, model, optimizer, reg_params, t, label)

    def _restore(self, state: dict[str, Any], t: int) -> tuple[Any, ...]:
        """Model, optimizer, scheduler and reg_params of a committed state."""
        cfg = self.config
        try:  # a checkpoint that loads but does not fit this model is a damaged file too
            model = self._restore_model(state, t)
            reg_params = {n: {k: v.to(self.device, copy=True) for k, v in d.items()}
                          for n, d in state["reg_params"].items()}
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            optimizer = mas_optim.LocalSgd(trainable, reg_params=reg_params,
                                           reg_lambda=cfg["reg_lambda"], lr=cfg["init_lr"],
                                           momentum=MOMENTUM, proximal=cfg["proximal"],
                                           track_path_integral=cfg["method"] == "si")
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, LR_STEP_EPOCHS, LR_GAMMA)
            if state["epoch"] > 0:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AppError(f"{self.run_dir.path(CHECKPOINT)}: does not fit the model "
                           f"({first[:160]})") from None
        return model, optimizer, scheduler, reg_params

    def train_epoch(self, model: torch.nn.Module, optimizer: mas_optim.LocalSgd, task: Task,
                    t: int, epoch: int, label: str) -> tuple[float, float]:
        """One pass over the task's data in an order fixed by (seed, task, epoch); under
        torchrun over this rank's shard of it (``utils.data.train_shard``)."""
        dist, seed = self.dist, self.config["seed"]
        model.train()
        if dist.active:
            # the global RNG (dropout, random flips) as a pure function of (seed, task, epoch,
            # rank): a resume with as many processes continues exactly, and ranks differ
            torch.manual_seed(derived_seed(seed, "rng", t, epoch, dist.rank))
        loader = train_shard(task.train, self.config["batch_size"], derived_seed(seed, t, epoch),
                             dist.rank, dist.world)
        total, seen, middle = 0.0, 0, len(loader) // 2
        bad: float | None = None
        for i, (x, y) in enumerate(self.progress.bar(loader, f"{label} epoch {epoch + 1}")):
            if i == middle:
                self.hook("mid-epoch")
            x, y = x.to(self.device), y.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                if not dist.active:
                    raise self._diverged(t, epoch, f"the loss became {loss.item()}")
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
                raise self._diverged(t, epoch, f"the loss became {bad}")
        penalty = float(optimizer.penalty())
        if not math.isfinite(penalty):
            raise self._diverged(t, epoch, f"the MAS penalty became {penalty}")
        return total / max(seen, 1), penalty

    def finish_task(self, state: dict[str, Any], model: TaskModel,
                    optimizer: mas_optim.LocalSgd,
                    reg_params: dict[str, dict[str, torch.Tensor]], t: int, label: str
                    ) -> dict[str, Any]:
        """Evaluate all tasks so far, estimate importance, consolidate, commit, export."""
        cfg = self.config
        row = []
        own_head = model.head
        for j in range(t + 1):
            if j < t:
                model.head = new_head(own_head.in_features, len(self.tasks[j].classes), 0)
                model.load_part("head", state["heads"][j])
                model.head.to(self.device)
            else:
                model.head = own_head
            # under torchrun each rank evaluates its share; the counts are summed over ranks
            loader = fixed_shard(self.tasks[j].test, cfg["batch_size"], self.dist.rank,
                                 self.dist.world)
            row.append(accuracy(model, loader, self.device,
                                self.dist.sum_counts if self.dist.active else None))
        omega = self._importance(model, optimizer, reg_params, t, label)
        if not all(torch.isfinite(o).all() for o in omega.values()):
            raise self._diverged(t, cfg["num_epochs"] - 1, "the importance Omega is not finite")
        reg_params = mas_optim.consolidate_reg_params(reg_params, model, omega,
                                                      accumulate=cfg["accumulate"])
        state = {**state, "task": t + 1, "epoch": 0, "shared": _cpu(model.part_state("shared")),
                 "head": None, "heads": state["heads"] + [_cpu(model.part_state("head"))],
                 "optimizer": None, "scheduler": None,
                 "reg_params": {n: _cpu(d) for n, d in reg_params.items()},
                 "acc_matrix": state["acc_matrix"] + [row], "rng": _rng_state(self.device)}
        with self.dist.step():
            self.dist.check_same({**state["shared"], **state["heads"][-1], **{
                f"{n}.{k}": v for n, d in state["reg_params"].items() for k, v in d.items()}},
                f"the model and importance after task {t + 1}")
            if self.dist.is_main:
                self.run_dir.save_checkpoint(state)
                self.export(state)
        self.progress.log(f"{label} done: accuracy " + " ".join(f"{a:.1f}" for a in row))
        self.hook("after-task")
        return state

    def _importance(self, model: TaskModel, optimizer: mas_optim.LocalSgd,
                    reg_params: dict[str, dict[str, torch.Tensor]], t: int, label: str
                    ) -> dict[str, torch.Tensor]:
        """Omega of the task just learnt, by --method: MAS (Eq. 2 on the network's output),
        l-MAS (Eq. 2 per layer, the paper's local Hebbian variant), SI (Zenke et al. 2017:
        the path integral LocalSgd tracked while training) or none (fine-tuning: zeros)."""
        method = self.config["method"]
        if method == "finetune":
            return {n: torch.zeros_like(e["omega"]) for n, e in reg_params.items()}
        if method == "si":  # the same on every rank: DDP makes the gradients and steps equal
            return optimizer.path_integral_omega()
        # the plain model, never the DDP wrapper (its forward would sync buffers over ranks
        # whose shards differ in batch count); compute_omega sums over the ranks' shards
        return mas_optim.compute_omega(model, self._importance_batches(t, label),
                                       per_sample=self.config["omega"] == "per-sample",
                                       method="local" if method == "lmas" else "global")

    def _importance_batches(self, t: int, label: str) -> Iterator[Any]:
        """The task's training data in fixed order for the importance pass (on the device);
        under torchrun this rank's whole batches of it (``utils.data.fixed_shard``)."""
        loader = fixed_shard(self.tasks[t].train, self.config["batch_size"], self.dist.rank,
                             self.dist.world)
        middle = len(loader) // 2
        for i, (x, y) in enumerate(self.progress.bar(loader, f"{label} importance")):
            if i == middle:
                self.hook("importance")
            yield x.to(self.device), y.to(self.device)

    def _check_finite(self, model: TaskModel, t: int, epoch: int, what: str) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise self._diverged(t, epoch, f"{what} became NaN or Inf")

    def _diverged(self, t: int, epoch: int, what: str) -> Diverged:
        cfg = self.config
        # every check that raises it sees the same values on every rank (parameters, penalty
        # and Omega are identical under DDP; the losses are gathered first)
        return everywhere(Diverged(
            f"training diverged on task {t + 1}, epoch {epoch + 1}: {what} with --reg_lambda "
            f"{cfg['reg_lambda']} and --init_lr {cfg['init_lr']} (the penalty step "
            f"2*lr*reg_lambda*Omega is too large for an explicit gradient step); lower --init_lr "
            f"or --reg_lambda and start again with --overwrite. The last good state is kept in "
            f"{self.run_dir.path(CHECKPOINT)}"))

    # public files
    def export(self, state: dict[str, Any]) -> None:
        """Write the original layout's files from a committed state (skipping unchanged ones)."""
        done = state["task"]
        if done == 0:
            return
        for k in range(done):
            folder = self.run_dir.task_dir(k)
            self.run_dir.write(f"{folder}/head.pth", to_bytes(state["heads"][k]))
            self.run_dir.write(f"{folder}/classes.txt", ("\n".join(state["classes"][k]) +
                                                         "\n").encode())
            self.run_dir.write(f"{folder}/performance.txt",
                               f"{state['acc_matrix'][k][k]:.4f}\n".encode())
        self.run_dir.write_reg_params(state["reg_params"])
        self.run_dir.write(SHARED, to_bytes(state["shared"]))
        doc = results(state["tasks"], state["acc_matrix"], state["config"])
        self.run_dir.write(RESULTS, results_json(doc))
        if done == len(state["tasks"]):
            self.run_dir.write(PLOT, plot(doc))


# --- entry point -------------------------------------------------------------------------------
def run(args: argparse.Namespace, given: dict[str, Any], dist: Dist | None = None) -> int:
    """The whole run. Under torchrun (``dist.active``) every rank runs this: every rank checks
    the flags and reads the same committed files (nothing is written before all of them agree
    that everything is valid), only rank 0 writes and prints, and an error on any rank stops
    every rank at the next agreement point (``dist.step()``) with that one line and exit 2."""
    dist = dist or Dist()
    run_dir = RunDir(Path(args.output_dir), CrashHook.from_env())
    progress = Progress(sys.stdout.isatty(), quiet=not dist.is_main)
    device = dist.start(args.use_gpu)  # under torchrun: join the process group
    with dist.step():  # every rank: check flags, files and data; write nothing
        if args.resume and args.overwrite:
            raise AppError("give either --resume (continue the run) or --overwrite (start over)")
        run_dir.prepare(create=False)
        if args.resume:
            state = run_dir.load_checkpoint()
            if state is None:
                raise AppError(f"--resume: nothing to resume in {run_dir.root} (no {CHECKPOINT})")
            missing = [k for k in CONFIG_KEYS if k not in state["config"]]
            if missing:
                raise AppError(f"{run_dir.path(CHECKPOINT)}: settings missing "
                               f"({', '.join(missing)})")
            config = resume_config(state["config"], given, run_dir.root)
            run_dir.check_saved_files(state)
        else:
            config = resolve_config(args)
            if run_dir.path(CHECKPOINT).exists() and not args.overwrite:
                raise AppError(f"{run_dir.root} already holds a run ({CHECKPOINT}): add --resume "
                               "to continue it, --overwrite to start over, or pick another "
                               "--output_dir")
            state = None
        tasks = load_tasks(config)
        if state is not None and ([t.name for t in tasks] != state["tasks"]
                                  or [t.classes for t in tasks] != state["classes"]):
            raise AppError(f"--resume: the tasks found now differ from those of the run in "
                           f"{run_dir.root} ({', '.join(map(str, state['tasks']))})")
        trainer = Trainer(config, tasks, run_dir, device, progress, dist)
        resumed = state is not None
        if state is None:
            state = trainer.initial_state()  # every rank: the same, from --seed
    with dist.step():  # rank 0 writes; the others wait for it
        if dist.is_main:
            if not resumed:
                # only now, with data and model known to be good, is anything on disk touched
                run_dir.prepare(create=True)
                run_dir.clear()
                run_dir.save_checkpoint(state)
            else:
                run_dir.remove_stale_temp_files()
    if dist.active and dist.is_main and config["batch_size"] % dist.world:
        per_rank = math.ceil(config["batch_size"] / dist.world)
        progress.log(f"note: --batch_size {config['batch_size']} over {dist.world} processes: "
                     f"{per_rank} per process, {per_rank * dist.world} per step")
    doc = trainer.run(state, resumed=resumed)
    if dist.is_main:
        print(report(doc))
        print(f"Saved in {run_dir.root}/: {SHARED}, reg_params.pickle, Task_k/, {RESULTS}, "
              f"{PLOT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; input and file problems -> one line on stderr, exit code 2.

    Under torchrun every rank runs this; only rank 0 prints (flag errors and --help included),
    and every rank leaves the process group before it exits."""
    try:
        dist = Dist.from_env()
    except AppError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    quiet = contextlib.ExitStack()
    if not dist.is_main:
        devnull = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(devnull))
        quiet.enter_context(contextlib.redirect_stderr(devnull))
    with quiet:
        try:
            args, given = parse_flags(sys.argv[1:] if argv is None else list(argv))
        except SystemExit as stop:  # argparse: --help (0) or a bad flag (2, its line printed)
            return int(stop.code or 0)
    try:
        return run(args, given, dist)
    except AppError as exc:
        if dist.is_main or not is_everywhere(exc):  # an error one rank alone saw: it says so
            where = "" if dist.is_main else f"(rank {dist.rank}) "
            print(f"train.py: error: {where}{exc}", file=sys.stderr, flush=True)
        dist.after_error(exc)
        return 2
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
