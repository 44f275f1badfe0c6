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
* ``utils/data.py``, ``utils/folders.py``: built-in task sequences, image folders
* ``utils/evaluate.py``, ``utils/distributed.py``: results, torchrun

Under ``torchrun --standalone --nproc_per_node N train.py ...`` it trains data-parallel
(DistributedDataParallel, gloo on CPUs, NCCL with --use_gpu), or with ``--fsdp`` with the model,
optimizer state and reg_params sharded over the processes (``utils/fsdp.py``); only rank 0 writes
and prints.
Run ``python train.py --help`` for the flags; docs/train.md describes them, the output and numbers.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

STARTING = "interrupted while starting, before anything was written"


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"train.py: {STARTING}", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from utils import AppError  # noqa: E402 (after the handler: these imports load torch)
from utils import sweep
from utils.checkpoint import (CHECKPOINT, PLOT, REG_PARAMS, RESULTS, SHARED, CrashTest, RunDir,
                              RunState)
from utils.config import FOLDERS, SMALL_IMAGE_ARCH, SMALL_IMAGE_PX, Config, build_parser
from utils.data import Task, permuted_digits, split_digits, split_mnist
from utils.distributed import Dist, is_everywhere
from utils.evaluate import report
from utils.folders import image_folder_tasks, image_side
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


def with_default_backbone(given: dict[str, Any]) -> dict[str, Any]:
    """The flags of a new run, with ``--arch`` chosen for the size of ``--data_dir`` images when
    it is left out (and --pretrained, which is AlexNet's, too): images under SMALL_IMAGE_PX
    (--image_size if given, else the images' own larger side) get SMALL_IMAGE_ARCH, said in
    one line; larger ones keep AlexNet, as in the original."""
    if given.get("data_dir") is None or given.get("benchmark") is not None \
            or given.get("arch") or given.get("pretrained"):
        return given
    side = given.get("image_size") or image_side(given["data_dir"])
    if side >= SMALL_IMAGE_PX:
        return given
    log(f"note: {side}-px images (under {SMALL_IMAGE_PX}): --arch {SMALL_IMAGE_ARCH} by default, "
        "which learns such images with these defaults (AlexNet is built for 224-px images and "
        "writes ~680 MB checkpoints); give --arch to choose")
    return {**given, "arch": SMALL_IMAGE_ARCH}


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
        config = Config.from_flags(with_default_backbone(given))
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


def run(given: dict[str, Any], run_dir: RunDir, dist: Dist) -> int:
    """One run in ``run_dir``, or with several --reg_lambda values a sweep of them, one run
    each in ``run_dir/lambda_<value>/`` (``utils/sweep.py``)."""
    given, values = sweep.split_flags(given)
    if values is None:
        run_one(given, dist, load_tasks, run_dir)
    else:
        rows = sweep.run_sweep(given, values, dist, run_one, sweep.load_once(load_tasks))
        print(sweep.report(rows, str(run_dir.root)))
    return 0


def run_one(given: dict[str, Any], dist: Dist, load: Callable[[Config], list[Task]],
            run_dir: RunDir) -> dict[str, Any]:
    """The whole run; returns its results document. Under torchrun (``dist.active``) every
    rank runs this: every rank checks the flags and reads the same committed files (nothing is
    written before all of them agree that everything is valid), only rank 0 writes and prints,
    and an error on any rank stops every rank at the next ``error_barrier`` with that one line
    and exit 2."""
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


def interrupted(given: dict[str, Any], run_dir: RunDir, dist: Dist) -> str:
    """The line after Ctrl-C: the exact command that continues the run (or the sweep), or,
    before the run's first commit, that there is nothing to resume."""
    if not run_dir.committed and not run_dir.path(sweep.PLAN).exists():  # a sweep resumes whole
        return ("interrupted before the run's first checkpoint: nothing to resume; run the same "
                "command again")
    # flags that are not stored with the run must be given again; the stored ones come from it
    again = {k: v for k, v in given.items()
             if k not in Config.stored_names() and k not in ("resume", "overwrite", "output_dir")}
    args = ["--resume", "--output_dir", str(run_dir.root)]
    for name, value in again.items():
        args += [f"--{name}"] if value is True else [f"--{name}", f"{value:g}" if isinstance(
            value, float) else str(value)]
    start = f"torchrun --nproc_per_node {dist.world} train.py" if dist.active else \
        "python train.py"
    return f"interrupted; continue with: {start} {shlex.join(args)}"


def from_ctrl_c(exc: BaseException) -> bool:
    """A KeyboardInterrupt, or an error raised while one was on its way out: a library's
    cleanup that failed under it (tqdm's write lock, interrupted while being created, raises
    AttributeError in its ``finally``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


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
        run_dir = RunDir(Path(given.get("output_dir", Config().output_dir)),
                         CrashTest.from_env())
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: below
        try:
            return run(given, run_dir, dist)
        except AppError as exc:
            if dist.is_main or not is_everywhere(exc):  # an error one rank alone saw: it says so
                where = "" if dist.is_main else f"(rank {dist.rank}) "
                print(f"train.py: error: {where}{exc}", file=sys.stderr, flush=True)
            dist.after_error(exc)
            return 2
        except BaseException as exc:  # Ctrl-C: what to do next, not a traceback
            if not from_ctrl_c(exc):
                raise
            if dist.is_main:
                print(f"train.py: {interrupted(given, run_dir, dist)}", file=sys.stderr,
                      flush=True)
            return 130
        finally:
            dist.close()


if __name__ == "__main__":
    sys.exit(main())
