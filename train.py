"""Learn a sequence of tasks with Memory Aware Synapses and report forgetting.

For each task: train the shared model and the task's head with ``mas_optim.LocalSgd`` (the MAS
penalty lambda * sum Omega (theta - theta*)^2 of Aljundi et al. 2018, Eq. 3, applied inside the
optimiser step), evaluate every task seen so far, estimate parameter importance Omega on the
task's training data (``mas_optim.compute_omega``, Eq. 2), fold it into reg_params
(``consolidate_reg_params``) and commit everything to ``--output_dir``.

Where things are:

* ``utils/config.py``      every flag, its default (per benchmark) and help: ``Config``
* ``utils/methods.py``     ``--method``: the table from a name to its importance function
* ``utils/trainer.py``     the loop over tasks and epochs
* ``utils/checkpoint.py``  the run state (``RunState``) and its files on disk
* ``utils/data.py``, ``utils/evaluate.py``, ``utils/distributed.py``: data, results, torchrun

Under ``torchrun --standalone --nproc_per_node N train.py ...`` it trains data-parallel
(DistributedDataParallel, gloo on CPUs, NCCL with --use_gpu), or with ``--fsdp`` with the model,
optimizer state and reg_params sharded over the processes (``utils/fsdp.py``); only rank 0 writes
and prints.
Run ``python train.py --help`` for the flags; README.md describes outputs and numbers.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from utils import AppError
from utils import sweep
from utils.checkpoint import (CHECKPOINT, PLOT, REG_PARAMS, RESULTS, SHARED, CrashTest, RunDir,
                              RunState)
from utils.config import FOLDERS, Config, build_parser
from utils.data import Task, image_folder_tasks, permuted_digits, split_digits, split_mnist
from utils.distributed import Dist, is_everywhere
from utils.evaluate import report
from utils.lambda_search import AUTO
from utils.trainer import Trainer, log


def load_tasks(config: Config) -> list[Task]:
    if config.benchmark == FOLDERS:
        return image_folder_tasks(config.data_dir, config.image_size, arch=config.arch,
                                  augment=config.augment, normalize=config.normalize,
                                  stored=config.preprocessing,
                                  cache_mb=config.cache_mb, log=log)
    if config.benchmark == "split-mnist":
        return split_mnist(config.mnist_root)
    return split_digits() if config.benchmark == "split-digits" else permuted_digits()


def start(given: dict[str, Any], run_dir: RunDir, device: Any, dist: Dist,
          load: Callable[[Config], list[Task]] = load_tasks) -> tuple[Trainer, RunState, bool]:
    """Check the flags, the files and the data (every rank; nothing is written): the trainer,
    the committed state to continue from (a new one for a new run) and whether it is resumed."""
    if given.get("resume") and given.get("overwrite"):
        raise AppError("give either --resume (continue the run) or --overwrite (start over)")
    run_dir.prepare(create=False)
    state = run_dir.load_checkpoint() if given.get("resume") else None
    if given.get("resume"):
        if state is None:
            raise AppError(f"--resume: nothing to resume in {run_dir.root} (no {CHECKPOINT})")
        config = Config.resumed(state.config, given, str(run_dir.path(CHECKPOINT)))
        run_dir.check_saved_files(state)
    else:
        config = Config.from_flags(given)
        if run_dir.path(CHECKPOINT).exists() and not config.overwrite:
            raise AppError(f"{run_dir.root} already holds a run ({CHECKPOINT}): add --resume to "
                           "continue it, --overwrite to start over, or pick another --output_dir")
    if config.reg_lambda == AUTO and dist.active:
        raise AppError("--reg_lambda auto searches in one process: start it without torchrun")
    if config.fsdp and not dist.active:
        raise AppError("--fsdp shards the model over processes: start train.py under torchrun "
                       "(torchrun --standalone --nproc_per_node N train.py --fsdp ...)")
    tasks = load(config)
    if state is not None and ([t.name for t in tasks] != state.tasks
                              or [t.classes for t in tasks] != state.classes):
        raise AppError(f"--resume: the tasks found now differ from those of the run in "
                       f"{run_dir.root} ({', '.join(map(str, state.tasks))})")
    if state is None and tasks[0].preprocessing is not None:  # a resume keeps the stored one
        config = replace(config, preprocessing=tasks[0].preprocessing.to_dict())
    trainer = Trainer(config, tasks, run_dir, device, dist)
    return trainer, state or trainer.new_state(), state is not None


def run(given: dict[str, Any], dist: Dist) -> int:
    """One run, or with several --reg_lambda values a sweep of them (``utils/sweep.py``)."""
    given, values = sweep.split_flags(given)
    if values is None:
        run_one(given, dist, load_tasks, CrashTest.from_env())
    else:
        rows = sweep.run_sweep(given, values, dist, run_one, sweep.load_once(load_tasks))
        print(sweep.report(rows, given.get("output_dir", Config().output_dir)))
    return 0


def run_one(given: dict[str, Any], dist: Dist, load: Callable[[Config], list[Task]],
            crash_test: CrashTest) -> dict[str, Any]:
    """The whole run; returns its results document. Under torchrun (``dist.active``) every
    rank runs this: every rank checks the flags and reads the same committed files (nothing is
    written before all of them agree that everything is valid), only rank 0 writes and prints,
    and an error on any rank stops every rank at the next ``error_barrier`` with that one line
    and exit 2."""
    defaults = Config()
    run_dir = RunDir(Path(given.get("output_dir", defaults.output_dir)), crash_test)
    device = dist.start(given.get("use_gpu", False))  # under torchrun: join the process group
    with dist.error_barrier():  # every rank: check flags, files and data; write nothing
        trainer, state, resumed = start(given, run_dir, device, dist, load)
    with dist.error_barrier():  # rank 0 writes; the others wait for it
        if dist.is_main and not resumed:
            # only now, with data and model known to be good, is anything on disk touched
            run_dir.prepare(create=True)
            run_dir.clear()
            run_dir.save_checkpoint(state)
        elif dist.is_main:
            run_dir.remove_stale_temp_files()
    finished = resumed and state.task == len(trainer.tasks)
    if not finished:
        log("settings: " + ", ".join(f"{k} {v}" for k, v in trainer.config.to_dict().items()
                                     if v is not None))
    batch_size = trainer.config.batch_size
    if dist.active and batch_size % dist.world:
        per_rank = math.ceil(batch_size / dist.world)
        log(f"note: --batch_size {batch_size} over {dist.world} processes: {per_rank} per "
            f"process, {per_rank * dist.world} per step")
    doc = trainer.run(state, resumed=resumed)
    print(report(doc))
    if not finished:
        print(f"Saved in {run_dir.root}/: {SHARED}, {REG_PARAMS}, Task_k/, {RESULTS}, {PLOT}")
    elif run_dir.written:  # a kill during the last task's public files: completed now
        print(f"The run in {run_dir.root}/ was already finished; completed its files from "
              f"{CHECKPOINT}: {', '.join(run_dir.written)}")
    else:
        print(f"The run in {run_dir.root}/ was already finished: nothing to resume, nothing "
              "written (the report above is its results.json)")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; input and file problems -> one line on stderr, exit code 2.

    Under torchrun every rank runs this; only rank 0 prints (the other ranks' stdout goes to
    os.devnull, and their stderr too while the flags are parsed: --help and flag errors), and
    every rank leaves the process group before it exits."""
    try:
        dist = Dist.from_env()
    except AppError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as quiet:
        if not dist.is_main:
            quiet.enter_context(contextlib.redirect_stdout(
                quiet.enter_context(open(os.devnull, "w"))))
        with contextlib.ExitStack() as parsing:
            if not dist.is_main:
                parsing.enter_context(contextlib.redirect_stderr(sys.stdout))
            try:
                given = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
            except SystemExit as stop:  # argparse: --help (0) or a bad flag (2, its line printed)
                return int(stop.code or 0)
        try:
            return run(given, dist)
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
