"""The run's state on disk: one atomic checkpoint, the public files derived from it, a crash hook.

Consistency rule (issue 6): everything needed to resume -- shared weights, heads, reg_params,
optimizer, scheduler, RNG state, accuracy matrix and the progress marker -- lives in ONE file,
``checkpoint.pth``, written atomically (``mas_optim.atomic_write``: temp file, fsync, rename). A
restart therefore never sees two moments mixed. The public files of the original layout
(``shared_model.pth``, ``reg_params.pickle``, ``Task_k/*``, ``results.json``, ``accuracy.png``)
are pure functions of a committed checkpoint, written after it (each atomically too), so a crash
between them is repaired by writing them again from the checkpoint.

Every load uses ``torch.load(..., weights_only=True)`` or ``mas_optim.load_reg_params`` (a
restricted unpickler): a file never executes code. Damage is reported as one ``AppError`` line
naming the file.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

import mas_optim
from utils import AppError

KILL_ENV = "MAS_OPTIM_KILL_AT"
CHECKPOINT = "checkpoint.pth"
SHARED = "shared_model.pth"
REG_PARAMS = "reg_params.pickle"
RESULTS = "results.json"
PLOT = "accuracy.png"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("version", "config", "tasks", "classes", "task", "epoch", "shared", "head",
                    "heads", "optimizer", "scheduler", "reg_params", "acc_matrix", "rng")


class CrashHook:
    """Crash-test hook: ``MAS_OPTIM_KILL_AT=<point>[:<n>]`` SIGKILLs the process the n-th time
    (default 1st) that the code reaches ``<point>``.

    Points: ``mid-epoch``, ``after-epoch``, ``importance``, ``after-task`` and
    ``write:<file>`` (``<file>`` relative to --output_dir, e.g. ``write:checkpoint.pth`` or
    ``write:Task_2/head.pth``; hit after the temp file is durable, before the rename). The
    counter lives in this object, not in module state.
    """

    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.target = 1
        self.count = 0
        if spec:
            point, _, n = spec.rpartition(":")
            if point and n.isdigit():
                self.point, self.target = point, int(n)
            else:
                self.point = spec

    @classmethod
    def from_env(cls) -> "CrashHook":
        return cls(os.environ.get(KILL_ENV))

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.count += 1
        if self.count == self.target:
            os.kill(os.getpid(), signal.SIGKILL)


def to_bytes(obj: Any) -> bytes:
    """Serialise tensors/containers with ``torch.save`` (deterministic bytes for equal content)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_tensors(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU; any failure -> one-line AppError."""
    try:
        if path.stat().st_size == 0:
            raise AppError(f"{path}: empty file (damaged)")
        with warnings.catch_warnings():  # e.g. "unusual pickle protocol": the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except AppError:
        raise
    except OSError as exc:
        raise AppError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except pickle.UnpicklingError as exc:
        # torch's message: boilerplate, then the reason, then a link; keep the reason only
        detail = str(exc).split("trusted source.", 1)[-1].split("Check the doc")[0]
        detail = " ".join(detail.rpartition("WeightsUnpickler error:")[2].split())
        detail = detail or _first_sentence(exc)
        if "GLOBAL" in detail:
            raise AppError(f"{path}: refused: it asks for code or objects a weights file never "
                           f"needs ({detail[:120]})") from None
        raise AppError(f"{path}: damaged or not a weights file ({detail[:160]})") from None
    except Exception as exc:  # truncated zip, garbage: torch raises many types
        raise AppError(f"{path}: damaged or not a weights file ({_first_sentence(exc)})") from None


def _first_sentence(exc: Exception) -> str:
    text = str(exc).strip().split("\n")[0].split(". ")[0]
    return text[:160] if text else type(exc).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


class RunDir:
    """The files of one run inside ``--output_dir``; all writes atomic and crash-hooked."""

    def __init__(self, root: Path, hook: CrashHook) -> None:
        self.root = root
        self.hook = hook

    def path(self, rel: str) -> Path:
        return self.root / rel

    @staticmethod
    def task_dir(k: int) -> str:
        """Folder of task ``k`` (0-based) as the original names it: ``Task_1``, ``Task_2``, ..."""
        return f"Task_{k + 1}"

    def prepare(self, create: bool) -> None:
        """Refuse an --output_dir that is a file; create the folder if asked."""
        if self.root.exists() and not self.root.is_dir():
            raise AppError(f"--output_dir {self.root} is a file, not a folder")
        if not create:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AppError(f"--output_dir {self.root}: cannot create it ({exc.strerror})") from None

    def remove_stale_temp_files(self) -> None:
        """Delete temp files of writes that a crash interrupted before their rename
        (``atomic_write`` names them ``.<name>.<random>.tmp`` beside the target)."""
        names = (CHECKPOINT, SHARED, REG_PARAMS, RESULTS, PLOT, "head.pth", "classes.txt",
                 "performance.txt")
        for folder in [self.root, *self.root.glob("Task_*")]:
            for name in names:
                for tmp in folder.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove a previous run's files (only the names this program writes), checkpoint
        first: a run interrupted while clearing is no longer resumable, never half-old."""
        for rel in (CHECKPOINT, SHARED, REG_PARAMS, RESULTS, PLOT):
            self.path(rel).unlink(missing_ok=True)
        for folder in self.root.glob("Task_*"):
            for name in ("head.pth", "classes.txt", "performance.txt"):
                (folder / name).unlink(missing_ok=True)
        self.remove_stale_temp_files()
        for folder in self.root.glob("Task_*"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def write(self, rel: str, data: bytes) -> None:
        """Atomically write ``data`` to ``rel``; skip when the file already holds exactly it, so
        re-deriving the public files of a finished run changes nothing."""
        path = self.path(rel)
        try:
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return
        except OSError:
            pass  # missing or unreadable: write it
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            mas_optim.atomic_write(path, data, before_replace=lambda: self.hook(f"write:{rel}"))

    def write_reg_params(self, reg_params: dict[str, dict[str, torch.Tensor]]) -> None:
        """Save reg_params with the library's own (atomic) writer unless the file holds them."""
        path = self.path(REG_PARAMS)
        if path.is_file():
            try:
                if _same_reg_params(mas_optim.load_reg_params(path), reg_params):
                    return
            except mas_optim.RegParamsError:
                pass  # checked before anything is written; here it is just to be replaced
        with _write_errors(path):
            mas_optim.save_reg_params(reg_params, path,
                                      before_replace=lambda: self.hook(f"write:{REG_PARAMS}"))

    # --- the checkpoint -------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Commit the whole run state in one atomic write (the commit point of the run)."""
        self.write(CHECKPOINT, to_bytes(state))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The committed run state, ``None`` when there is no checkpoint; AppError if damaged."""
        path = self.path(CHECKPOINT)
        if not path.exists():
            return None
        state = load_tensors(path)
        problem = _checkpoint_problem(state)
        if problem:
            raise AppError(f"{path}: not a checkpoint of this program ({problem})")
        return state

    def check_saved_files(self, state: dict[str, Any]) -> None:
        """Before a resume writes anything: every public file present must load cleanly.

        A damaged file means something outside this program touched it (our writes are atomic);
        we stop and name it rather than silently overwrite evidence.
        """
        shared_keys = set(state["shared"])
        path = self.path(SHARED)
        if path.exists():
            obj = load_tensors(path)
            if not _is_tensor_dict(obj) or set(obj) != shared_keys:
                raise AppError(f"{path}: not the shared model of this run (wrong tensor names)")
        path = self.path(REG_PARAMS)
        if path.exists():
            try:
                mas_optim.load_reg_params(path)
            except mas_optim.RegParamsError as exc:
                raise AppError(str(exc).splitlines()[0]) from None
        for k in range(len(state["heads"])):
            path = self.path(f"{self.task_dir(k)}/head.pth")
            if path.exists() and not _is_tensor_dict(load_tensors(path)):
                raise AppError(f"{path}: not a head state dict")


def _same_reg_params(a: Any, b: dict[str, dict[str, torch.Tensor]]) -> bool:
    if not isinstance(a, dict) or a.keys() != b.keys():
        return False
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in b[n])
               for n in b)


def _checkpoint_problem(state: Any) -> str | None:
    """Why ``state`` is not a usable checkpoint, or None. Checked before any of it is used."""
    try:
        return _structure_problem(state)
    except (AttributeError, KeyError, TypeError) as exc:
        return f"malformed ({type(exc).__name__}: {exc})"


def _structure_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, expected a dict"
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    if state["version"] != CHECKPOINT_VERSION:
        return f"version {state['version']!r}, expected {CHECKPOINT_VERSION}"
    if not _is_tensor_dict(state["shared"]):
        return "shared weights are not a tensor dict"
    n_tasks = len(state["tasks"])
    if not (isinstance(state["task"], int) and 0 <= state["task"] <= n_tasks):
        return f"task index {state['task']!r} outside 0..{n_tasks}"
    if len(state["heads"]) != state["task"] or len(state["acc_matrix"]) != state["task"]:
        return "heads/accuracy rows do not match the number of finished tasks"
    if not all(_is_tensor_dict(h) for h in state["heads"] + [state["head"] or {}]):
        return "a head is not a tensor dict"
    if any(len(row) != i + 1 for i, row in enumerate(state["acc_matrix"])):
        return "the accuracy matrix is not lower-triangular"
    if not isinstance(state["config"], dict):
        return "config is not a dict"
    for name, tensors in list(state["shared"].items()) + [
            (f"{n}.{k}", v) for n, d in state["reg_params"].items() for k, v in d.items()]:
        if tensors.is_floating_point() and not torch.isfinite(tensors).all():
            return f"{name} holds NaN or Inf"
    return None


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, no permission) is one line naming the file; atomic_write has
    left the previous version of the file, and so the last committed state, as it was."""
    try:
        yield
    except OSError as exc:
        raise AppError(f"{path}: cannot write: {exc.strerror or exc} (the last committed state "
                       "on disk is intact; free space or fix permissions, then --resume)") from None
