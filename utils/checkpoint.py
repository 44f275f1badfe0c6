"""The run's state on disk: one atomic checkpoint (``RunState``), the public files derived from
it (``RunDir``), and the crash-test kill points (``CrashTest``).

Everything needed to resume -- weights, heads, reg_params, optimizer, scheduler, RNG state,
accuracy matrix and the progress marker -- lives in ONE file, ``checkpoint.pth``, written
atomically (``mas_optim.atomic_write``: temp file, fsync, rename), so a restart never sees two
moments mixed. The public files of the original layout (``shared_model.pth``,
``reg_params.pickle``, ``Task_k/*``, ``results.json``, ``accuracy.png``) are pure functions of a
committed checkpoint, written after it (each atomically too), so a crash between them is
repaired by writing them again from the checkpoint.

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
import struct
import sys
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch

import mas_optim
from utils import AppError, first_line

KILL_ENV = "MAS_OPTIM_KILL_AT"
CHECKPOINT = "checkpoint.pth"
SHARED = "shared_model.pth"
REG_PARAMS = "reg_params.pickle"
RESULTS = "results.json"
PLOT = "accuracy.png"
CHECKPOINT_VERSION = 1
Tensors = dict[str, torch.Tensor]
OPTIONAL = ("lambdas",)  # RunState entries that checkpoints of earlier versions lack
RegParams = dict[str, Tensors]


class CrashTest:
    """Kill points for crash tests: ``MAS_OPTIM_KILL_AT=<point>[:<n>]`` SIGKILLs the process the
    n-th time (default 1st) that the code reaches ``kill_point(<point>)``.

    Points: ``mid-epoch``, ``after-epoch``, ``importance``, ``after-task`` and
    ``write:<file>`` (``<file>`` relative to --output_dir, e.g. ``write:checkpoint.pth`` or
    ``write:Task_2/head.pth``; reached after the temp file is durable, before the rename).
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
    def from_env(cls) -> "CrashTest":
        return cls(os.environ.get(KILL_ENV))

    def kill_point(self, point: str) -> None:
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


def _interned(obj: Any) -> Any:
    """``obj`` with every string interned. Pickle writes a string seen before as a reference to
    it by identity, so equal strings that are one object in one run (a setting named like a
    field, ``"optimizer"``) and two in a resumed one (read from the checkpoint) would give other
    bytes; interned, equal strings are always one object."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_interned(k): _interned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_interned(v) for v in obj)
    return obj


def load_tensors(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU; a file it cannot load -> one-line
    AppError naming it."""
    try:
        if path.stat().st_size == 0:
            raise AppError(f"{path}: empty file (damaged)")
        with warnings.catch_warnings():  # e.g. "unusual pickle protocol": the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise AppError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except pickle.UnpicklingError:
        raise AppError(f"{path}: damaged, or holds more than tensors and plain containers "
                       "(refused by torch's weights-only loader)") from None
    except (RuntimeError, EOFError, ValueError, LookupError, TypeError, OverflowError,
            struct.error) as exc:
        # what torch's zip reader and weights-only unpickler raise on malformed bytes (a
        # truncated archive: RuntimeError; garbage opcodes: IndexError, KeyError,
        # UnicodeDecodeError, EOFError, struct.error for a short length field, TypeError or
        # OverflowError for operands of the wrong kind or size)
        raise AppError(f"{path}: damaged or not a weights file ({first_line(exc)})") from None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass(frozen=True)
class RunState:
    """Everything a run needs to continue: the content of ``checkpoint.pth``.

    ``task`` tasks are finished; of task ``task`` (0-based), ``epoch`` epochs are. ``head``,
    ``optimizer`` and ``scheduler`` belong to that unfinished task (None at its start). Tensors
    are on the CPU.
    """

    config: dict[str, Any]
    tasks: list[str]
    classes: list[list[str]]
    shared: Tensors
    reg_params: RegParams
    rng: dict[str, Any]
    task: int = 0
    epoch: int = 0
    head: Tensors | None = None
    heads: list[Tensors] = field(default_factory=list)  # one per finished task
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    acc_matrix: list[list[float]] = field(default_factory=list)  # row i: after task i
    version: int = CHECKPOINT_VERSION
    # --reg_lambda auto: the λ chosen for each task started (None: task 1, no penalty)
    lambdas: list[float | None] = field(default_factory=list)

    def after_epoch(self, **changes: Any) -> "RunState":
        return replace(self, epoch=self.epoch + 1, **changes)

    def after_task(self, head: Tensors, row: list[float], **changes: Any) -> "RunState":
        return replace(self, task=self.task + 1, epoch=0, head=None, optimizer=None,
                       scheduler=None, heads=[*self.heads, head],
                       acc_matrix=[*self.acc_matrix, row], **changes)

    def to_bytes(self) -> bytes:
        return to_bytes(_interned({f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def load(cls, path: Path) -> "RunState":
        """The state in ``path``, checked before any of it is used; AppError if it is not one."""
        obj = load_tensors(path)
        problem = cls._problem(obj)
        if problem:
            raise AppError(f"{path}: not a checkpoint of this program ({problem})")
        return cls(**obj)

    @classmethod
    def _problem(cls, obj: Any) -> str | None:
        """Why ``obj`` (what torch.load returned) is not a usable state, or None."""
        if not isinstance(obj, dict):
            return f"holds a {type(obj).__name__}, expected a dict"
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in obj and k not in OPTIONAL]
        if missing:
            return f"missing {', '.join(missing)}"
        unknown = sorted(map(str, set(obj) - set(names)))
        if unknown:
            return f"unknown entries {', '.join(unknown)}"
        if obj["version"] != CHECKPOINT_VERSION:
            return f"version {obj['version']!r}, expected {CHECKPOINT_VERSION}"
        if not isinstance(obj["config"], dict):
            return "config is not a dict"
        if not all(isinstance(x, list) for x in (obj["tasks"], obj["classes"], obj["heads"],
                                                 obj["acc_matrix"])):
            return "tasks, classes, heads or acc_matrix is not a list"
        n_tasks = len(obj["tasks"])
        if not (type(obj["task"]) is int and 0 <= obj["task"] <= n_tasks):
            return f"task index {obj['task']!r} outside 0..{n_tasks}"
        if not (type(obj["epoch"]) is int and obj["epoch"] >= 0):
            return f"epoch {obj['epoch']!r} is not a count"
        if len(obj["heads"]) != obj["task"] or len(obj["acc_matrix"]) != obj["task"]:
            return "heads/accuracy rows do not match the number of finished tasks"
        lambdas = obj.get("lambdas", [])
        if not (isinstance(lambdas, list) and len(lambdas) <= obj["task"] + 1 and all(
                v is None or type(v) is float and v >= 0 for v in lambdas)):
            return "lambdas is not a list of chosen lambdas, one per task started"
        if not all(is_tensor_dict(h) for h in [obj["shared"], *obj["heads"], obj["head"] or {}]):
            return "the shared weights or a head is not a tensor dict"
        if any(not isinstance(row, list) or len(row) != i + 1
               for i, row in enumerate(obj["acc_matrix"])):
            return "the accuracy matrix is not lower-triangular"
        if not (isinstance(obj["reg_params"], dict) and all(
                is_tensor_dict(d) and set(d) == {"omega", "init_val"}
                for d in obj["reg_params"].values())):
            return "reg_params is not {name: {omega, init_val}}"
        if not (isinstance(obj["rng"], dict) and isinstance(obj["rng"].get("torch"),
                                                            torch.Tensor)):
            return "rng is not an RNG state"
        for name, tensor in [*obj["shared"].items(), *[
                (f"{n}.{k}", v) for n, d in obj["reg_params"].items() for k, v in d.items()]]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f"{name} holds NaN or Inf"
        return None


class RunDir:
    """The files of one run inside ``--output_dir``; every write atomic, with a kill point
    between its durable temp file and the rename."""

    def __init__(self, root: Path, crash_test: CrashTest) -> None:
        self.root = root
        self.crash_test = crash_test
        self.written: list[str] = []  # files this process wrote (relative to root), in order
        self._loaded_or_saved = False
        self._saving = False  # a checkpoint write has begun (any older one was cleared before)

    @property
    def committed(self) -> bool:
        """A checkpoint of this run is on disk (read for --resume or written here): what a
        message after an interrupt or a failed write may offer to --resume. A Ctrl-C between
        the checkpoint's rename and the end of ``save_checkpoint`` still counts it."""
        return self._loaded_or_saved or (self._saving and self.path(CHECKPOINT).exists())

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
        with _write_errors(self.root, committed=False):
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
        with _write_errors(path, self.committed):
            path.parent.mkdir(parents=True, exist_ok=True)
            mas_optim.atomic_write(
                path, data, before_replace=lambda: self.crash_test.kill_point(f"write:{rel}"))
        self.written.append(rel)

    def write_reg_params(self, reg_params: RegParams) -> None:
        """Save reg_params with the library's own (atomic) writer unless the file holds them."""
        path = self.path(REG_PARAMS)
        if path.is_file():
            try:
                if _same_reg_params(mas_optim.load_reg_params(path), reg_params):
                    return
            except mas_optim.RegParamsError:
                pass  # checked before anything is written; here it is just to be replaced
        with _write_errors(path, self.committed):
            mas_optim.save_reg_params(
                reg_params, path,
                before_replace=lambda: self.crash_test.kill_point(f"write:{REG_PARAMS}"))
        self.written.append(REG_PARAMS)

    def save_checkpoint(self, state: RunState) -> None:
        """Commit the whole run state in one atomic write (the commit point of the run)."""
        self._saving = True
        self.write(CHECKPOINT, state.to_bytes())
        self._loaded_or_saved = True

    def load_checkpoint(self) -> RunState | None:
        """The committed run state, ``None`` when there is no checkpoint; AppError if damaged."""
        path = self.path(CHECKPOINT)
        if not path.exists():
            return None
        state = RunState.load(path)
        self._loaded_or_saved = True
        return state

    def check_saved_files(self, state: RunState) -> None:
        """Before a resume writes anything: every public file present must load cleanly.

        A damaged file means something outside this program touched it (our writes are atomic);
        we stop and name it rather than silently overwrite evidence.
        """
        path = self.path(SHARED)
        if path.exists():
            obj = load_tensors(path)
            if not is_tensor_dict(obj) or set(obj) != set(state.shared):
                raise AppError(f"{path}: not the shared model of this run (wrong tensor names)")
        path = self.path(REG_PARAMS)
        if path.exists():
            try:
                mas_optim.load_reg_params(path)
            except mas_optim.RegParamsError as exc:
                raise AppError(first_line(exc, limit=400)) from None
        for k in range(len(state.heads)):
            path = self.path(f"{self.task_dir(k)}/head.pth")
            if path.exists() and not is_tensor_dict(load_tensors(path)):
                raise AppError(f"{path}: not a head state dict")


def _same_reg_params(a: Any, b: RegParams) -> bool:
    if not isinstance(a, dict) or a.keys() != b.keys():
        return False
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in b[n])
               for n in b)


@contextlib.contextmanager
def _write_errors(path: Path, committed: bool) -> Iterator[None]:
    """A failed write (disk full, no permission) is one line naming the file and what to do:
    atomic_write has left the previous version of the file, and so the last committed state, as
    it was; before the run's first commit there is no such state, and nothing to resume."""
    try:
        yield
    except OSError as exc:
        then = ("the last committed state on disk is intact; free space or fix permissions, "
                "then --resume" if committed else "nothing of this run was committed yet, so "
                "there is nothing to resume; free space or fix permissions, then run the same "
                "command again")
        raise AppError(f"{path}: cannot write: {exc.strerror or exc} ({then})") from None
